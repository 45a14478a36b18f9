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

/// Resolves `name` (as written in a workflow whose file is in `base_dir`) to a folder.
pub fn resolve_model(
    base_dir: &Path,
    name: &str,
    hub_cache: Option<&Path>,
) -> Result<PathBuf, ModelNotFound> {
    let mut searched = Vec::new();
    let expanded = match name.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(rest))
            .unwrap_or_else(|| PathBuf::from(name)),
        None => PathBuf::from(name),
    };
    let local = if expanded.is_absolute() {
        expanded
    } else {
        base_dir.join(expanded)
    };
    if local.is_dir() {
        return Ok(local.canonicalize().unwrap_or(local));
    }
    searched.push(local);

    // A hub id has exactly one slash and no path syntax.
    let is_hub_id = name.matches('/').count() == 1
        && !name.starts_with('.')
        && !name.starts_with('/')
        && !name.contains("..");
    if let (true, Some(hub)) = (is_hub_id, hub_cache) {
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
        if let Some(snapshot) = by_ref.or_else(any_snapshot) {
            return Ok(snapshot);
        }
        searched.push(snapshots);
    }
    Err(ModelNotFound {
        name: name.to_string(),
        searched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_folder_resolves_against_the_workflow_directory() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("models/sd")).unwrap();
        let found = resolve_model(&tmp.path().join("models"), "sd", None).unwrap();
        assert_eq!(found, tmp.path().join("models/sd").canonicalize().unwrap());
    }

    #[test]
    fn a_hub_id_resolves_to_the_snapshot_named_by_refs_main() {
        let hub = tempfile::tempdir().unwrap();
        let repo = hub.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/old")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let found = resolve_model(Path::new("/nonexistent"), "org/name", Some(hub.path())).unwrap();
        assert_eq!(found, repo.join("snapshots/abc123"));
    }

    #[test]
    fn a_missing_model_names_every_place_searched() {
        let hub = tempfile::tempdir().unwrap();
        let err =
            resolve_model(Path::new("/work/flows"), "org/missing", Some(hub.path())).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/work/flows/org/missing"), "{text}");
        assert!(text.contains("models--org--missing/snapshots"), "{text}");
    }
}
