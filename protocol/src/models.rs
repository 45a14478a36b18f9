//! Where a workflow's `model_name` points: a local diffusers folder, else a snapshot in the
//! Hugging Face cache (offline), and an error naming every place searched otherwise.

use std::path::{Path, PathBuf};

/// A model that could not be found, with the places searched.
#[derive(Debug, thiserror::Error)]
#[error("model `{name}` not found; searched: {}", searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
pub struct ModelNotFound {
    pub name: String,
    pub searched: Vec<PathBuf>,
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(home).join("hub"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/huggingface/hub"))
}

/// Where a relative `model_name` is looked for.
#[derive(Debug, Clone, Copy)]
pub struct Places<'a> {
    /// The caller's working directory, where diffusers' `from_pretrained` looks first.
    pub cwd: Option<&'a Path>,
    /// The workflow file's folder: a fallback, so a workflow and its models can move
    /// together.
    pub workflow_dir: &'a Path,
    /// The Hugging Face hub cache (see [`hub_cache_dir`]).
    pub hub_cache: Option<&'a Path>,
}

/// Resolves `name` to a folder as diffusers-workflow does: a local folder relative to the
/// working directory (or absolute, or `~/...`), else the hub cache's snapshot of a hub id,
/// else a folder relative to the workflow file.
pub fn resolve_model(name: &str, places: &Places<'_>) -> Result<PathBuf, ModelNotFound> {
    let mut searched = Vec::new();
    let expanded = match name.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(rest))
            .unwrap_or_else(|| PathBuf::from(name)),
        None => PathBuf::from(name),
    };
    let mut local_candidates = Vec::new();
    if expanded.is_absolute() {
        local_candidates.push(expanded.clone());
    } else if let Some(cwd) = places.cwd {
        local_candidates.push(cwd.join(&expanded));
    }
    for local in local_candidates {
        if local.is_dir() {
            return Ok(local.canonicalize().unwrap_or(local));
        }
        searched.push(local);
    }
    if let Some(hub) = places.hub_cache.filter(|_| is_hub_id(name)) {
        match hub_snapshot(hub, name) {
            Ok(snapshot) => return Ok(snapshot),
            Err(looked_at) => searched.push(looked_at),
        }
    }
    let beside = places.workflow_dir.join(&expanded);
    if !expanded.is_absolute() && !searched.contains(&beside) {
        if beside.is_dir() {
            return Ok(beside.canonicalize().unwrap_or(beside));
        }
        searched.push(beside);
    }
    Err(ModelNotFound {
        name: name.to_string(),
        searched,
    })
}

/// A hub id has exactly one slash and no path syntax.
fn is_hub_id(name: &str) -> bool {
    name.matches('/').count() == 1
        && !name.starts_with('.')
        && !name.starts_with('/')
        && !name.starts_with('~')
        && !name.contains("..")
}

/// The snapshot `refs/main` names (else the newest), or the folder looked in.
fn hub_snapshot(hub: &Path, name: &str) -> Result<PathBuf, PathBuf> {
    let repo = hub.join(format!("models--{}", name.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    let by_ref = std::fs::read_to_string(repo.join("refs").join("main"))
        .ok()
        .map(|commit| snapshots.join(commit.trim()))
        .filter(|p| p.is_dir());
    let any_snapshot = || {
        std::fs::read_dir(&snapshots)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    };
    by_ref.or_else(any_snapshot).ok_or(snapshots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_folder_resolves_against_the_workflow_directory() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("models/sd")).unwrap();
        let places = Places {
            cwd: Some(Path::new("/nonexistent")),
            workflow_dir: &tmp.path().join("models"),
            hub_cache: None,
        };
        let found = resolve_model("sd", &places).unwrap();
        assert_eq!(found, tmp.path().join("models/sd").canonicalize().unwrap());
    }

    // diffusers' from_pretrained reads a relative folder from the working directory first.
    #[test]
    fn the_working_directory_comes_before_the_hub_and_the_workflow_folder() {
        let tmp = tempfile::tempdir().unwrap();
        for dir in [
            "cwd/org/name",
            "flows/org/name",
            "hub/models--org--name/snapshots/abc",
        ] {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
        }
        let (hub, cwd, flows) = (
            tmp.path().join("hub"),
            tmp.path().join("cwd"),
            tmp.path().join("flows"),
        );
        let mut places = Places {
            cwd: Some(&cwd),
            workflow_dir: &flows,
            hub_cache: Some(&hub),
        };
        let found = resolve_model("org/name", &places).unwrap();
        assert_eq!(found, cwd.join("org/name").canonicalize().unwrap());
        places.cwd = None;
        let found = resolve_model("org/name", &places).unwrap();
        assert_eq!(found, hub.join("models--org--name/snapshots/abc"));
        places.hub_cache = None;
        let found = resolve_model("org/name", &places).unwrap();
        assert_eq!(
            found,
            tmp.path().join("flows/org/name").canonicalize().unwrap()
        );
    }

    #[test]
    fn a_hub_id_resolves_to_the_snapshot_named_by_refs_main() {
        let hub = tempfile::tempdir().unwrap();
        let repo = hub.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/old")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let places = Places {
            cwd: None,
            workflow_dir: Path::new("/nonexistent"),
            hub_cache: Some(hub.path()),
        };
        let found = resolve_model("org/name", &places).unwrap();
        assert_eq!(found, repo.join("snapshots/abc123"));
    }

    #[test]
    fn a_missing_model_names_every_place_searched() {
        let hub = tempfile::tempdir().unwrap();
        let places = Places {
            cwd: Some(Path::new("/home/me")),
            workflow_dir: Path::new("/work/flows"),
            hub_cache: Some(hub.path()),
        };
        let text = resolve_model("org/missing", &places)
            .unwrap_err()
            .to_string();
        let cwd = text.find("/home/me/org/missing").expect(&text);
        let hub = text.find("models--org--missing/snapshots").expect(&text);
        let flows = text.find("/work/flows/org/missing").expect(&text);
        assert!(cwd < hub && hub < flows, "searched in order: {text}");
    }
}
