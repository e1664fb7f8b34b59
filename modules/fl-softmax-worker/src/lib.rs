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

    use crate::softmax::{self, Config, Dataset, Params};
    use crate::synthetic::Synthetic;
    use tessera::module::local;
    use tessera::module::log::{Level, log};

    struct Worker;

    fn read_dataset(name: &str) -> Result<Vec<u8>, String> {
        let size = local::dataset_size(name)?;
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

    impl Guest for Worker {
        fn run(config: String, inputs: Vec<Blob>) -> Result<Vec<Blob>, String> {
            let cfg: Config = serde_json::from_str(&config).map_err(|e| format!("bad config: {e}"))?;
            let model = inputs.iter().find(|b| b.name == "model").map(|b| Params::decode(&b.data)).transpose()?;
            let blob = |name: &str, data: Vec<u8>| Blob { name: name.into(), data };
            match cfg.mode.as_str() {
                "init" => Ok(vec![blob("model", Params::zeros(cfg.classes, cfg.features).encode())]),
                "train" | "evaluate" => {
                    let params = model.ok_or("input `model` is missing")?;
                    let bytes = read_dataset(&cfg.dataset)?;
                    let data = match Synthetic::from_dataset(&bytes) {
                        // A participant is a device of the synthetic population.
                        Some(spec) => {
                            let spec = spec?;
                            spec.device(spec.device_of(&local::node(), cfg.partition), cfg.features, cfg.classes)?
                        }
                        None => Dataset::decode(&bytes, cfg.features)?.partition(
                            cfg.partition,
                            cfg.partitions,
                            cfg.features,
                        )?,
                    };
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
