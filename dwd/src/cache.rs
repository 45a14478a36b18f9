//! Loaded model components, kept between jobs.
//!
//! A component (tokenizer, text encoder, UNet, VAE) is keyed by what determines its
//! weights: its type, its resolved folder, dtype, device, and the identity (path, size,
//! mtime) of the files it was loaded from. Editing a workflow's prompt never reloads
//! anything; two workflows on one model share its components; replacing a weight file on
//! disk changes the key, so the next run loads the new weights.

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use protocol::message::LoadedComponent;

/// Identity of one weight or config file: where, how big, when last written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub modified_ns: u128,
}

impl FileIdentity {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let modified_ns = meta
            .modified()?
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Ok(FileIdentity {
            path: path.to_path_buf(),
            size: meta.len(),
            modified_ns,
        })
    }
}

/// What determines a loaded component's weights.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ComponentKey {
    pub component_type: &'static str,
    /// Resolved model folder (the pipeline's, not the component's subfolder).
    pub model: PathBuf,
    pub dtype: String,
    pub device: String,
    pub files: Vec<FileIdentity>,
}

struct Entry {
    value: Arc<dyn Any + Send + Sync>,
    bytes: u64,
    hits: u64,
    last_used_unix: u64,
}

/// The daemon's loaded components. Cheap to clone; all clones share one cache.
#[derive(Clone, Default)]
pub struct ComponentCache {
    entries: Arc<Mutex<HashMap<ComponentKey, Entry>>>,
}

/// Whether a lookup found the component loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
}

/// What a `clear` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleared {
    pub unloaded: u64,
    pub bytes_freed: u64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl ComponentCache {
    fn lock(&self) -> MutexGuard<'_, HashMap<ComponentKey, Entry>> {
        // A panic while holding the lock cannot leave an entry half-written (inserts and
        // removals are single operations), so a poisoned map is still consistent.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the component for `key`, loading it with `load` (which also reports its
    /// size in bytes) when it is not cached. The lock is not held while loading.
    pub fn get_or_load<T, E>(
        &self,
        key: ComponentKey,
        load: impl FnOnce() -> Result<(T, u64), E>,
    ) -> Result<(Arc<T>, Lookup), E>
    where
        T: Send + Sync + 'static,
    {
        if let Some(entry) = self.lock().get_mut(&key) {
            if let Ok(value) = Arc::clone(&entry.value).downcast::<T>() {
                entry.hits += 1;
                entry.last_used_unix = now_unix();
                return Ok((value, Lookup::Hit));
            }
        }
        let (value, bytes) = load()?;
        let value = Arc::new(value);
        let entry = Entry {
            value: value.clone(),
            bytes,
            hits: 0,
            last_used_unix: now_unix(),
        };
        self.lock().insert(key, entry);
        Ok((value, Lookup::Miss))
    }

    /// Unloads every component, or only those of models whose folder matches `model`
    /// (the full path, or its last path component). A job that is using a component keeps
    /// it until it finishes; the memory is freed then.
    pub fn clear(&self, model: Option<&str>) -> Cleared {
        let mut entries = self.lock();
        let mut cleared = Cleared::default();
        entries.retain(|key, entry| {
            let matches = match model {
                None => true,
                Some(m) => {
                    key.model == Path::new(m) || key.model.file_name().is_some_and(|n| n == m)
                }
            };
            if matches {
                cleared.unloaded += 1;
                cleared.bytes_freed += entry.bytes;
            }
            !matches
        });
        cleared
    }

    /// What is loaded, largest first.
    pub fn report(&self) -> Vec<LoadedComponent> {
        let entries = self.lock();
        let mut loaded: Vec<LoadedComponent> = entries
            .iter()
            .map(|(key, entry)| LoadedComponent {
                model: key.model.display().to_string(),
                component_type: key.component_type.to_string(),
                dtype: key.dtype.clone(),
                device: key.device.clone(),
                bytes: entry.bytes,
                hits: entry.hits,
                last_used_unix: entry.last_used_unix,
            })
            .collect();
        loaded.sort_by(|a, b| {
            b.bytes
                .cmp(&a.bytes)
                .then(a.component_type.cmp(&b.component_type))
        });
        loaded
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: &str, files: Vec<FileIdentity>) -> ComponentKey {
        ComponentKey {
            component_type: "unet",
            model: PathBuf::from(model),
            dtype: "f32".into(),
            device: "cpu".into(),
            files,
        }
    }

    #[test]
    fn a_second_lookup_of_the_same_key_is_a_hit_and_does_not_load() {
        let cache = ComponentCache::default();
        let (a, first) = cache
            .get_or_load(key("/m", vec![]), || Ok::<_, ()>((5u32, 100)))
            .unwrap();
        let (b, second) = cache
            .get_or_load(key("/m", vec![]), || -> Result<(u32, u64), ()> {
                panic!("must not load again")
            })
            .unwrap();
        assert_eq!((first, second), (Lookup::Miss, Lookup::Hit));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cache.report()[0].hits, 1);
    }

    #[test]
    fn a_changed_weight_file_identity_loads_again() {
        let cache = ComponentCache::default();
        let old = FileIdentity {
            path: "/m/w".into(),
            size: 10,
            modified_ns: 1,
        };
        let new = FileIdentity {
            modified_ns: 2,
            ..old.clone()
        };
        cache
            .get_or_load(key("/m", vec![old]), || Ok::<_, ()>((1u8, 1)))
            .unwrap();
        let (_, lookup) = cache
            .get_or_load(key("/m", vec![new]), || Ok::<_, ()>((2u8, 1)))
            .unwrap();
        assert_eq!(lookup, Lookup::Miss);
    }

    #[test]
    fn clear_reports_what_it_unloaded_and_can_target_one_model() {
        let cache = ComponentCache::default();
        cache
            .get_or_load(key("/a/sd15", vec![]), || Ok::<_, ()>((1u8, 100)))
            .unwrap();
        cache
            .get_or_load(key("/b/other", vec![]), || Ok::<_, ()>((1u8, 50)))
            .unwrap();
        assert_eq!(
            cache.clear(Some("sd15")),
            Cleared {
                unloaded: 1,
                bytes_freed: 100
            }
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(
            cache.clear(None),
            Cleared {
                unloaded: 1,
                bytes_freed: 50
            }
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn a_failed_load_caches_nothing() {
        let cache = ComponentCache::default();
        let result = cache.get_or_load(key("/m", vec![]), || Err::<(u8, u64), _>("broken"));
        assert_eq!(result.err(), Some("broken"));
        assert!(cache.is_empty());
    }
}
