//! The Debian package: built with cargo-deb from the metadata in Cargo.toml (around the test
//! build's binary), installed, upgraded, removed and purged with dpkg in a throwaway root
//! (`dpkg --root`, maintainer scripts run with `DPKG_ROOT`). `.ci/setup` installs cargo-deb.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn build_deb(out: &Path, version: &str) {
    let o = Command::new(env!("CARGO"))
        .current_dir(repo())
        .args([
            "deb",
            "--no-build",
            "--no-strip",
            "--fast",
            "--profile",
            "dev",
        ])
        .args(["--deb-version", version, "--output"])
        .arg(out)
        .output()
        .expect("cargo deb (cargo install cargo-deb --locked)");
    assert!(
        o.status.success(),
        "cargo deb: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn dpkg(root: &Path, args: &[&str]) -> String {
    let o = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-not-root",
            "--force-depends",
            "--force-confold",
            "--log=/dev/null",
        ])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "dpkg {args:?}: {text}");
    text
}

fn status(root: &Path) -> String {
    let o = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${Status} ${Version}", "edgecoder"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn the_package_installs_upgrades_and_purges_in_a_throwaway_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(root.join("var/lib/dpkg/available"), "").unwrap();

    // Install.
    let v1 = dir.path().join("edgecoder_1.deb");
    build_deb(&v1, "0.1.0-1");
    dpkg(&root, &["-i", v1.to_str().unwrap()]);
    assert_eq!(status(&root), "install ok installed 0.1.0-1");
    for f in [
        "usr/bin/edgecoder",
        "usr/lib/systemd/system/edgecoder.service",
        "usr/lib/systemd/system/edgecoder-anchor-proxy.service",
        "etc/edgecoder/anchor-proxy.toml",
        "usr/lib/systemd/system/edgecoder-portal.service",
        "etc/edgecoder/portal.toml",
        "usr/lib/sysusers.d/edgecoder.conf",
        "usr/lib/tmpfiles.d/edgecoder.conf",
        "usr/share/edgecoder/dropins/nvidia.conf",
        "usr/share/edgecoder/dropins/jetson.conf",
        "usr/share/edgecoder/board/rpi5.toml",
        "usr/share/doc/edgecoder/api/mesh.md",
        "etc/edgecoder/edgecoder.toml",
    ] {
        assert!(root.join(f).exists(), "{f} missing");
    }
    // postinst: the user exists, the service is enabled.
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("edgecoder:")),
        "{passwd}"
    );
    let wants = root.join("etc/systemd/system/multi-user.target.wants/edgecoder.service");
    assert!(wants.symlink_metadata().is_ok(), "not enabled");
    // The anchor proxy and the portal are separate deployments: installed, not enabled.
    for unit in ["edgecoder-anchor-proxy.service", "edgecoder-portal.service"] {
        assert!(
            root.join("etc/systemd/system/multi-user.target.wants")
                .join(unit)
                .symlink_metadata()
                .is_err(),
            "{unit} must not be enabled by the package"
        );
    }
    // The installed binary is the real one.
    let o = Command::new(root.join("usr/bin/edgecoder"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("edgecoder "));

    // Upgrade: the user's edit of the configuration survives; the node's state is untouched.
    let conf = root.join("etc/edgecoder/edgecoder.toml");
    std::fs::write(
        &conf,
        "[mesh]\nbootstrap_urls = [\"http://10.0.0.1:4301\"]\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("var/lib/edgecoder")).unwrap();
    std::fs::write(root.join("var/lib/edgecoder/identity.key"), "key").unwrap();
    let v2 = dir.path().join("edgecoder_2.deb");
    build_deb(&v2, "0.1.0-2");
    dpkg(&root, &["-i", v2.to_str().unwrap()]);
    assert_eq!(status(&root), "install ok installed 0.1.0-2");
    assert!(std::fs::read_to_string(&conf).unwrap().contains("10.0.0.1"));
    assert!(root.join("var/lib/edgecoder/identity.key").exists());

    // Remove keeps configuration and state; purge removes both.
    dpkg(&root, &["--remove", "edgecoder"]);
    assert!(!root.join("usr/bin/edgecoder").exists());
    assert!(conf.exists());
    assert!(root.join("var/lib/edgecoder/identity.key").exists());
    dpkg(&root, &["--purge", "edgecoder"]);
    assert!(!conf.exists());
    assert!(!root.join("var/lib/edgecoder").exists());
    assert!(wants.symlink_metadata().is_err());
    assert_eq!(status(&root), "");
}
