//! Bytes as a kernelspec document, rewritten as a list and as a single kernelspec under a few
//! policies. Checks (in `tests/oracle/`): no panic; `Ok` exactly when the body has the shape;
//! the output is JSON, and is the input with every kernelspec's `spec.metadata.client_envs` set
//! to the names the policy allows for it (computed here from the README's rule and compared with
//! `Policy::allowed_names`), every other member and its order kept.

#![no_main]

#[path = "../../tests/oracle/mod.rs"]
mod oracle;

use std::collections::HashMap;
use std::sync::OnceLock;

use envgate::policy::{EgEnvs, NameSet, Policy};
use libfuzzer_sys::fuzz_target;

fn set(names: &[&str]) -> NameSet {
    names.iter().map(|s| s.to_string()).collect()
}

fn policies() -> &'static [Policy] {
    static P: OnceLock<Vec<Policy>> = OnceLock::new();
    P.get_or_init(|| {
        let base = Policy { client_envs: set(&["FOO", "PATH"]), ..Policy::default() };
        vec![
            Policy { kernelspecs: HashMap::from([("python3".to_string(), set(&["PY_ONLY", "*"]))]), ..base.clone() },
            Policy {
                kernelspec_metadata: false,
                kernelspec_env: true,
                process_proxy_envs: true,
                eg_config: Some(EgEnvs { all: true, names: NameSet::new() }),
                deny_envs: set(&["FOO", "SPARK_HOME"]),
                ..base
            },
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    for p in policies() {
        oracle::check_kernelspec_list(p, data);
        oracle::check_kernelspec_one(p, data);
    }
});
