//! Python environments per module, built with uv from PyPI: two modules needing different
//! scikit-learn versions run side by side on one runtime, a module declaring a set seen
//! before reuses its environment without resolving again, and requirements that cannot be
//! met are refused at launch, naming the package.
#![cfg(target_os = "linux")]

mod common;

use std::sync::Arc;

use common::*;
use serde_json::json;
use tessera_ports::Instance;
use tessera_process::{Environments, ProcessLimits};

const VERSION: &str = r#"
import sklearn, sys
import tessera

class Versions(tessera.Task):
    def versions(self):
        return {"sklearn": sklearn.__version__, "python": sys.executable}
"#;

const PLAIN: &str = r#"
import numpy, sys
import tessera

class Plain(tessera.Task):
    def versions(self):
        return {"numpy": numpy.__version__, "python": sys.executable}
"#;

struct Setup {
    py: Python,
    envs: Arc<Environments>,
    _root: tempfile::TempDir,
}

fn setup() -> Setup {
    let uv = tessera_process::environments::find_uv(&python()).expect(
        "uv next to the interpreter under test (scripts/test installs it into target/venv), in TESSERA_UV or on PATH",
    );
    let root = tempfile::tempdir().unwrap();
    let envs = Arc::new(Environments::new(uv, root.path().to_owned(), python(), None));
    let mut py = python_runtime(ProcessLimits::default());
    py.runtime = py.runtime.with_environments(envs.clone());
    Setup { py, envs, _root: root }
}

fn with_files(yaml: &str, files: &[(&str, &str)]) -> Module {
    let mut all = vec![("model.py", VERSION, false)];
    all.extend(files.iter().map(|(n, t)| (*n, *t, false)));
    module("python", "model.py", &all, yaml)
}

async fn versions(s: &Setup, m: &Module) -> serde_json::Value {
    let mut inst = s.py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let out = result_json(&inst.call(call("versions", json!([]), json!({}))).await);
    inst.shutdown().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scikit_learn_versions_run_side_by_side_and_environments_are_reused() {
    let s = setup();
    let old = with_files("needs:\n  libraries: [scikit-learn==1.5.2]\n", &[]);
    let new = with_files("", &[("requirements.txt", "# the newer one\nscikit-learn==1.6.1\n")]);
    let a = versions(&s, &old).await;
    let b = versions(&s, &new).await;
    assert_eq!(a["sklearn"], "1.5.2", "{a}");
    assert_eq!(b["sklearn"], "1.6.1", "{b}");
    assert_ne!(a["python"], b["python"], "each in its own environment");
    assert_eq!((s.envs.resolves(), s.envs.builds()), (2, 2));

    // The same set declared again (other modules, the other ways of declaring it): no
    // resolve, no build, the same environment.
    let again = with_files("", &[("requirements.txt", "scikit_learn == 1.5.2\n")]);
    let c = versions(&s, &again).await;
    assert_eq!(c, a);
    let pyproject = "[project]\nname = \"m\"\ndependencies = [\"Scikit-Learn==1.5.2\"]\n";
    let d = versions(&s, &with_files("", &[("pyproject.toml", pyproject)])).await;
    assert_eq!(d, a);
    assert_eq!((s.envs.resolves(), s.envs.builds()), (2, 2), "the cached environment was reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_the_interpreter_satisfies_runs_with_it() {
    let s = setup();
    let m = module("python", "model.py", &[("model.py", PLAIN, false)], "needs:\n  libraries: [numpy]\n");
    let mut inst = s.py.runtime.spawn(&m.image, Ctx::new()).await.unwrap();
    let out = result_json(&inst.call(call("versions", json!([]), json!({}))).await);
    inst.shutdown().await;
    assert!(!out["python"].as_str().unwrap().contains(s._root.path().to_str().unwrap()), "{out}");
    assert_eq!((s.envs.resolves(), s.envs.builds()), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirements_that_cannot_be_met_are_refused_at_launch_naming_the_package() {
    let s = setup();
    let m = with_files("needs:\n  libraries: [scikit-learn==0.0.999]\n", &[]);
    let e = s.py.runtime.spawn(&m.image, Ctx::new()).await.unwrap_err().to_string();
    assert!(e.contains("cannot be met") && e.contains("scikit-learn"), "{e}");
    let m = with_files("", &[("requirements.txt", "no-such-distribution-tessera-test==1.0\n")]);
    let e = s.py.runtime.spawn(&m.image, Ctx::new()).await.unwrap_err().to_string();
    assert!(e.contains("no-such-distribution-tessera-test"), "{e}");
    // Lines that are not requirements (options, URLs, paths) are refused before uv runs.
    for line in ["--index-url http://example.invalid/simple", "pkg @ https://example.invalid/p.whl", "../elsewhere"] {
        let m = with_files("", &[("requirements.txt", &format!("numpy\n{line}\n"))]);
        let e = s.py.runtime.spawn(&m.image, Ctx::new()).await.unwrap_err().to_string();
        assert!(e.contains("requirements.txt line 2"), "{line}: {e}");
    }
    for (text, says) in [
        ("[project]\ndependencies = \"numpy\"\n", "must be a list"),
        ("[project]\ndependencies = [\"numpy\", 3]\n", "project.dependencies[1] must be a string"),
        ("[project]\ndependencies = [\"numpy\", \"--pre\"]\n", "project.dependencies[1]"),
        ("[project\n", "pyproject.toml"),
    ] {
        let m = with_files("", &[("pyproject.toml", text)]);
        let e = s.py.runtime.spawn(&m.image, Ctx::new()).await.unwrap_err().to_string();
        assert!(e.contains(says), "{text}: {e}");
    }
    assert_eq!(s.envs.builds(), 0);
}
