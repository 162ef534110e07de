//! The systemd units: `systemd-analyze verify` passes on the unit alone and with each board
//! drop-in, and the hardening scores at most 2.0 ("OK") under `systemd-analyze security`.
//! `.ci/setup` installs systemd (for `systemd-analyze`) where it is missing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Every unit the project ships.
const UNITS: [&str; 3] = [
    "edgecoder.service",
    "edgecoder-anchor-proxy.service",
    "edgecoder-portal.service",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A throwaway root holding the host's unit tree (targets the unit refers to), our unit, the
/// given drop-ins, and the built binary at /usr/bin/edgecoder.
fn root_with(dropins: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists())
        .expect("systemd's unit directory (install the systemd package)");
    copy_dir(host_units, &r.join("usr/lib/systemd/system"));
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    std::fs::copy(common::BIN, r.join("usr/bin/edgecoder")).unwrap();
    let etc = r.join("etc/systemd/system");
    std::fs::create_dir_all(etc.join("edgecoder.service.d")).unwrap();
    for unit in UNITS {
        std::fs::copy(repo().join("systemd").join(unit), etc.join(unit)).unwrap();
    }
    for d in dropins {
        std::fs::copy(
            repo().join("systemd/edgecoder.service.d").join(d),
            etc.join("edgecoder.service.d").join(d),
        )
        .unwrap();
    }
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let ty = e.file_type().unwrap();
        let dest = to.join(e.file_name());
        if ty.is_dir() {
            copy_dir(&e.path(), &dest);
        } else if ty.is_symlink() {
            let target = std::fs::read_link(e.path()).unwrap();
            let _ = std::os::unix::fs::symlink(target, &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

fn analyze(args: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (install the systemd package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `systemd-analyze verify` says nothing about `unit`, and its exposure is at most 2.0.
fn verify_and_score(root: &Path, unit: &str, what: &str) -> f64 {
    let r = format!("--root={}", root.display());
    let (ok, text) = analyze(&["verify", &r, unit]);
    // verify exits 0 on mere warnings (unknown keys, bad values are "ignoring"): any output
    // about our files is a defect.
    assert!(ok, "{what}: {text}");
    assert!(
        !text.contains("edgecoder"),
        "{what}: systemd-analyze verify complained:\n{text}"
    );
    let (ok, text) = analyze(&["security", "--offline=yes", &r, "--threshold=20", unit]);
    assert!(ok, "{what}: exposure above 2.0:\n{text}");
    let score: f64 = text
        .lines()
        .find_map(|l| l.split(&format!("exposure level for {unit}: ")).nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{text}"));
    assert!(score <= 2.0, "{what}: {score}");
    score
}

#[test]
fn the_unit_and_every_board_dropin_verify_and_score_ok() {
    for dropins in [&[][..], &["nvidia.conf"], &["jetson.conf"]] {
        let root = root_with(dropins);
        verify_and_score(root.path(), "edgecoder.service", &format!("{dropins:?}"));
    }
}

#[test]
fn the_anchor_proxy_and_portal_units_verify_and_score_ok() {
    let root = root_with(&[]);
    for (unit, command, config) in [
        (
            "edgecoder-anchor-proxy.service",
            "anchor-proxy",
            "anchor-proxy.toml",
        ),
        ("edgecoder-portal.service", "portal", "portal.toml"),
    ] {
        verify_and_score(root.path(), unit, unit);
        let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
        // The unit runs a command this binary has, with the configuration file the package
        // ships, and that file is valid.
        assert!(text.contains(&format!("ExecStart=/usr/bin/edgecoder {command}\n")));
        assert!(text.contains(&format!("EDGECODER_CONFIG=/etc/edgecoder/{config}")));
        let help = Command::new(common::BIN)
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(help.status.success(), "{unit}");
        let check = Command::new(common::BIN)
            .args(["check-config", "--config"])
            .arg(repo().join("packaging").join(config))
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

#[test]
fn the_sysusers_and_tmpfiles_entries_parse() {
    let sysusers = std::fs::read_to_string(repo().join("systemd/edgecoder.sysusers")).unwrap();
    let line = sysusers
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[..3], ["u", "edgecoder", "-"]);
    // The unit runs as that user.
    let unit = std::fs::read_to_string(repo().join("systemd/edgecoder.service")).unwrap();
    assert!(unit.contains("User=edgecoder"));
    let tmpfiles = std::fs::read_to_string(repo().join("systemd/edgecoder.tmpfiles")).unwrap();
    assert!(tmpfiles.lines().any(|l| l.starts_with("d /etc/edgecoder ")));
    // systemd-tmpfiles accepts it (dry run against a throwaway root).
    let root = tempfile::tempdir().unwrap();
    let out = Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(repo().join("systemd/edgecoder.tmpfiles"))
        .output()
        .expect("systemd-tmpfiles");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(root.path().join("etc/edgecoder").is_dir());
}
