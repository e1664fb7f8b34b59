//! Softmax regression for federated learning, as a Tessera WebAssembly module.
//!
//! The arithmetic lives in [`softmax`] (plain Rust, tested natively); the `run` export
//! reads the node's dataset through the task context and dispatches on `mode`. A dataset
//! file may instead describe FedProx's synthetic data set ([`synthetic`]): each simulated
//! participant then generates its own device's rows.

pub mod softmax;
pub mod synthetic;

#[cfg(target_arch = "wasm32")]
mod guest {
    wit_bindgen::generate!({ path: "../../wit", world: "module" });

    use std::cell::RefCell;
    use std::rc::Rc;

    use crate::softmax::{self, Config, Dataset, Params};
    use crate::synthetic::Synthetic;
    use tessera::module::local;
    use tessera::module::log::{Level, log};

    struct Worker;

    fn read_dataset(name: &str, size: u64) -> Result<Vec<u8>, String> {
        if size > (1 << 30) {
            return Err(format!("dataset {name} is {size} bytes; this worker reads at most 1 GiB"));
        }
        let mut out = Vec::with_capacity(size as usize);
        while (out.len() as u64) < size {
            let chunk = local::dataset_read(name, out.len() as u64, 1 << 20)?;
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// What a decoded dataset was decoded from: the dataset's name and size in bytes, the
    /// node, and the participant's share of it.
    type DatasetKey = (String, u64, String, usize, usize, usize, usize);

    thread_local! {
        /// The dataset the last task of this instance decoded. A node runs a session's
        /// later tasks in this instance only while the dataset files it was started with
        /// are unchanged (`reuse: session`: same file, same modification time), so a later
        /// task of the same participant, as FL clients do, reads and decodes it once; the
        /// size in the key is looked up afresh by every task besides.
        static LAST: RefCell<Option<(DatasetKey, Rc<Dataset>)>> = const { RefCell::new(None) };
    }

    /// This participant's rows of the node's dataset.
    fn dataset(cfg: &Config) -> Result<Rc<Dataset>, String> {
        let node = local::node();
        let size = local::dataset_size(&cfg.dataset)?;
        let key = (cfg.dataset.clone(), size, node.clone(), cfg.partition, cfg.partitions, cfg.features, cfg.classes);
        if let Some(data) = LAST.with_borrow(|last| last.as_ref().filter(|(k, _)| *k == key).map(|(_, d)| d.clone())) {
            return Ok(data);
        }
        // The previous one first: two decoded datasets are never held at once.
        LAST.set(None);
        let bytes = read_dataset(&cfg.dataset, size)?;
        let data = match Synthetic::from_dataset(&bytes) {
            // A participant is a device of the synthetic population.
            Some(spec) => {
                let spec = spec?;
                spec.device(spec.device_of(&node, cfg.partition), cfg.features, cfg.classes)?
            }
            None => Dataset::decode(&bytes, cfg.features)?.partition(cfg.partition, cfg.partitions, cfg.features)?,
        };
        let data = Rc::new(data);
        LAST.set(Some((key, data.clone())));
        Ok(data)
    }

    impl Guest for Worker {
        fn run(config: String, inputs: Vec<Blob>) -> Result<Vec<Blob>, String> {
            let cfg: Config = serde_json::from_str(&config).map_err(|e| format!("bad config: {e}"))?;
            let model = inputs.iter().find(|b| b.name == "model").map(|b| Params::decode(&b.data)).transpose()?;
            let blob = |name: &str, data: Vec<u8>| Blob { name: name.into(), data };
            match cfg.mode.as_str() {
                "init" => Ok(vec![blob("model", Params::zeros(cfg.classes, cfg.features).encode())]),
                "train" | "evaluate" => {
                    let params = model.ok_or("input `model` is missing")?;
                    let data = dataset(&cfg)?;
                    if cfg.mode == "train" {
                        let (params, metrics) = softmax::train(params, &data, &cfg)?;
                        log(
                            Level::Info,
                            &format!("trained on {} examples, loss {:.4}", metrics.num_examples, metrics.loss),
                        );
                        Ok(vec![blob("model", params.encode()), blob("metrics", metrics.to_json())])
                    } else {
                        let metrics = softmax::evaluate(&params, &data)?;
                        Ok(vec![blob("metrics", metrics.to_json())])
                    }
                }
                other => Err(format!("unknown mode {other:?}; expected init, train or evaluate")),
            }
        }
    }

    export!(Worker);
}
