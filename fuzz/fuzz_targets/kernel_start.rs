//! Bytes as a kernel-start body: the strict parse, then the decision under policies of every
//! mode and `path` rule, without identity binding and with it (trusted header absent, blank,
//! naming the body's own user or another, under `refuse` and `overwrite`). Checks (in
//! `tests/oracle/`): no panic; an accepted body reads the same to a lenient parser; the forwarded
//! body re-parses, keeps every other member, holds only names the policy allows and values the
//! value rules accept (report mode: the env as sent); under identity binding, the kernel's
//! `KERNEL_USERNAME` is the trusted user or the request is refused; a refusal names no value.

#![no_main]

#[path = "../../tests/oracle/mod.rs"]
mod oracle;

use std::collections::HashMap;
use std::sync::OnceLock;

use envgate::policy::{EgEnvs, Mode, NameSet, Policy, PrefixRule, SpecFacts};
use envgate::values::PathRule;
use libfuzzer_sys::fuzz_target;

fn set(names: &[&str]) -> NameSet {
    names.iter().map(|s| s.to_string()).collect()
}

fn policies() -> &'static [(Policy, Option<SpecFacts>)] {
    static P: OnceLock<Vec<(Policy, Option<SpecFacts>)>> = OnceLock::new();
    P.get_or_init(|| {
        let base = Policy { client_envs: set(&["FOO", "PATH"]), ..Policy::default() };
        let facts = SpecFacts {
            metadata_client_envs: set(&["META", "LD_PRELOAD"]),
            env_keys: set(&["SPARK_HOME"]),
            process_proxy_envs: set(&["PP"]),
        };
        vec![
            (
                Policy {
                    kernelspecs: HashMap::from([("python3".to_string(), set(&["PY_ONLY"]))]),
                    kernelspec_env: true,
                    ..base.clone()
                },
                Some(facts.clone()),
            ),
            (Policy { mode: Mode::Reject, kernel_path: PathRule::Strip, ..base.clone() }, Some(facts)),
            (Policy { mode: Mode::Report, kernel_path: PathRule::Keep, ..base.clone() }, None),
            (
                Policy {
                    prefixes: vec![PrefixRule::new("SPARK_")],
                    eg_config: Some(EgEnvs { all: true, names: NameSet::new() }),
                    kernel_path: PathRule::Strip,
                    values: envgate::values::ValueRules { max_length: 64, ..base.values.clone() },
                    ..base.clone()
                },
                None,
            ),
            (Policy { mode: Mode::Reject, deny_envs: NameSet::new(), ..base }, None),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    oracle::check_start_input(policies(), Some("python3"), data);
});
