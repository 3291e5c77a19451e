//! The workspace's examples as child processes for the integration tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The package whose `examples/` holds `name`: the crate's own examples, or the integration
/// package's (those that need its heavier dependencies).
fn package_of(name: &str) -> &'static str {
    match name {
        "full_service" | "upgrade_probe" => "finale-integration",
        _ => "finale",
    }
}

/// Builds the example `name` (all features, the test's own profile) and returns its path.
///
/// `cargo test --test X` does not rebuild examples, so a test that runs one builds it first:
/// the child is never a stale binary, and the build is a no-op when it is up to date.
pub(crate) fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args([
        "build",
        "--all-features",
        "-p",
        package_of(name),
        "--example",
        name,
    ]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    assert!(
        cargo.status().unwrap().success(),
        "cargo build --example {name}"
    );
    profile_dir.join("examples").join(name)
}
