//! The `full_service` example, built once per test binary, and a scratch directory for one
//! run's log file.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use super::components::free_port;

/// The `full_service` example's binary, built once per test binary.
pub(crate) fn full_service() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| super::examples::example("full_service"))
        .clone()
}

/// A scratch directory for one run's log file, removed on drop.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    /// A new directory, unique to this process and `name`.
    pub(crate) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "finale-{name}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// The service's log file in it.
    pub(crate) fn log(&self) -> PathBuf {
        self.0.join("service.log")
    }

    /// The requests the service logged as served.
    pub(crate) fn served(&self) -> usize {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("request served"))
            .count()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
