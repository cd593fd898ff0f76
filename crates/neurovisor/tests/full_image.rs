//! The full image adds Go and Rust toolchains (`neurovisor images build --image full`).

mod common;

use std::time::Duration;

use neurovisor::{ExecRequest, VmSize};

fn req(lang: &str, code: &str) -> ExecRequest {
    let mut r = ExecRequest::new(lang, code);
    // Compilers are slow under TCG emulation.
    r.timeout = Duration::from_secs(240);
    r
}

#[tokio::test]
async fn go_and_rust_compile_and_run() {
    let env = common::env_with_image("full");
    let names: Vec<_> = env
        .sandbox
        .images()
        .languages
        .iter()
        .map(|l| l.name.clone())
        .collect();
    assert_eq!(names, ["python", "bash", "javascript", "go", "rust"]);

    let go = env
        .try_run_sized(
            &req(
                "go",
                "package main\nimport (\"fmt\"; \"os\")\nfunc main() { fmt.Println(6*7, os.Args[1:]) }",
            ),
            VmSize::Medium,
        )
        .await
        .expect("go run");
    assert_eq!(go.out(), "42 []\n", "stderr: {}", go.err());

    let mut r = req("rust", "fn main() { let a: Vec<String> = std::env::args().skip(1).collect(); println!(\"{} {:?}\", 6 * 7, a); }");
    r.args = vec!["x".into()];
    let rs = env.try_run_sized(&r, VmSize::Medium).await.expect("rust");
    assert_eq!(rs.out(), "42 [\"x\"]\n", "stderr: {}", rs.err());

    // A compile error is the program's stderr and exit status.
    let bad = env
        .try_run_sized(&req("rust", "fn main() { let x: u32 = \"a\"; }"), VmSize::Medium)
        .await
        .expect("rust");
    assert_ne!(bad.outcome.exit_code, Some(0));
    assert!(bad.err().contains("mismatched types"), "{}", bad.err());
    env.assert_clean();
}
