//! Records the git commit the binary is built from as `ICP_GATE_COMMIT` (for
//! `icp_gate_build_info{commit}` and `--version`): the `ICP_GATE_COMMIT` environment variable
//! when set (a build from a source tarball, a container build), else `git rev-parse HEAD` of the
//! source tree, else "unknown".

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=ICP_GATE_COMMIT");
    let commit = match std::env::var("ICP_GATE_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => {
            // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it names (a commit)
            // and packed-refs. In a worktree, HEAD is in its own git dir, branches in the common one.
            if let (Some(dir), Some(common)) = (
                git(&["rev-parse", "--absolute-git-dir"]),
                git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
            ) {
                let common = PathBuf::from(common);
                let mut watched = vec![PathBuf::from(dir).join("HEAD"), common.join("packed-refs")];
                // Not the refs folder: in a repository shared by worktrees every commit on any
                // branch would rebuild the crate. (A branch whose ref is only in packed-refs at
                // build time and gets a loose file at its next commit is missed: `touch build.rs`.)
                if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                    watched.push(common.join(branch));
                }
                // A path that does not exist would rerun this script at every build.
                for path in watched.iter().filter(|p| p.exists()) {
                    println!("cargo::rerun-if-changed={}", path.display());
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string())
        }
    };
    // Only characters that are safe in a label value and a version line.
    let commit: String = commit
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(64)
        .collect();
    let commit = if commit.is_empty() {
        "unknown".to_string()
    } else {
        commit
    };
    println!("cargo::rustc-env=ICP_GATE_COMMIT={commit}");
}
