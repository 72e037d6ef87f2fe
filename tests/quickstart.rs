//! The README's first command, `scripts/quickstart`, run end to end (with the binary cargo built for
//! the tests instead of a release build, and `--once` so that it stops by itself).

mod support;

use std::process::Command;

#[test]
fn quickstart_shows_an_allowed_name_reaching_the_kernel_and_the_audit_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/quickstart"))
        .args(["--once", "--listen", &listen])
        .env("ENVGATE_BIN", support::envgate::bin())
        .output()
        .expect("running scripts/quickstart");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("python3 client_envs = ['DEMO_ALLOWED']"), "{text}");
    assert!(text.contains("DEMO_ALLOWED=reaches the kernel"), "{text}");
    assert!(text.contains("KERNEL_USERNAME=demo"), "{text}");
    // The disallowed names and EG's own secret stay out of the kernel.
    assert!(!text.contains("DEMO_SECRET="), "{text}");
    assert!(!text.contains("EG_DEMO_SECRET="), "{text}");
    assert!(!text.contains("PATH=/tmp/evil"), "{text}");
    let audit = text.lines().find(|l| l.starts_with("{\"timestamp\"")).expect("an audit line");
    support::envgate::valid_record(audit);
    let v: serde_json::Value = serde_json::from_str(audit).unwrap();
    assert_eq!(v["outcome"], "forwarded");
    assert_eq!(v["rejected"][0]["name"], "DEMO_SECRET");
}
