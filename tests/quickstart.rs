//! The quickstart on a headless machine: no error on stderr (Mesa's Vulkan device-select layer
//! makes libwayland print "error: XDG_RUNTIME_DIR is invalid or not set" where
//! `XDG_RUNTIME_DIR` is unset; `.cargo/config.toml` turns the layer off for cargo's runs).
//!
//! The quickstart runs in a child process (this test binary again, running only
//! `quickstart_child`), so that its stderr can be read and its environment chosen.

use std::process::Command;

#[allow(dead_code)] // its `main` is the example's, unused here
#[path = "../examples/quickstart.rs"]
mod quickstart;

/// Set in the child's environment: run the quickstart instead of returning at once.
const CHILD: &str = "WCCL_QUICKSTART_CHILD";

#[test]
fn quickstart_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    // 3 ranks (not a power of two), 0.3 MiB: the quickstart checks its sum against the host's
    // f64 sum itself and fails otherwise.
    if let Err(e) = quickstart::run(3, 0.3) {
        panic!("quickstart failed: {e}");
    }
}

#[test]
fn quickstart_prints_no_error_without_xdg_runtime_dir() {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args([
            "--exact",
            "quickstart_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("WAYLAND_SOCKET")
        .output()
        .expect("run the quickstart child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quickstart failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // The child really ran the quickstart (not a filtered-out no-op).
    assert!(
        stdout.contains("result matches the host's sum") && stdout.contains("rank 2:"),
        "{stdout}"
    );
    assert!(
        !stderr.to_lowercase().contains("error"),
        "the quickstart wrote an error to stderr:\n{stderr}"
    );
}
