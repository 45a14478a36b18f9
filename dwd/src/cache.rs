//! Loaded model components, kept between jobs, within a memory budget.
//!
//! A component (tokenizer, text encoder, UNet, VAE, ...) is keyed by what determines its
//! weights: its name and class, its resolved folder, dtype, device, variant and adapters,
//! and the identity (path, size, mtime) of the files it was loaded from. Two pipelines, of
//! one family or two, that use the same files share one loaded copy. Editing a workflow's prompt never reloads
//! anything; two workflows or steps on one model share its components; replacing a weight
//! file on disk changes the key, so the next run loads the new weights (and the stale copy
//! is dropped).
//!
//! Each component stays until its keep-alive runs out after its last use, or until room is
//! needed for another: then idle components go, least recently used first. A component a
//! running job holds is never unloaded.

use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::message::LoadedComponent;
use protocol::units::KeepAlive;

use crate::memory::{human_bytes, release_freed_memory};

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
    /// Its name in `model_index.json` (`vae`, `text_encoder_2`).
    pub component_type: &'static str,
    /// Its diffusers or transformers class.
    pub class: &'static str,
    /// Resolved model folder (the pipeline's, not the component's subfolder).
    pub model: PathBuf,
    pub dtype: String,
    pub device: String,
    /// `variant` (`fp16`), when one was asked for.
    pub variant: Option<String>,
    /// Adapters fused into its weights, in order (none yet).
    pub adapters: Vec<String>,
    pub files: Vec<FileIdentity>,
    /// Held in host memory for model offload while the device is another (a GPU): it
    /// takes none of the device's budget, and unloading it frees none.
    pub host: bool,
}

impl ComponentKey {
    /// Whether `other` is the same component at another version of its files.
    fn same_slot(&self, other: &ComponentKey) -> bool {
        self.component_type == other.component_type
            && self.class == other.class
            && self.variant == other.variant
            && self.adapters == other.adapters
            && self.model == other.model
            && self.dtype == other.dtype
            && self.device == other.device
    }
}

/// The most users a component lists (status stays small however many workflows ran).
const MAX_USERS_LISTED: usize = 16;

struct Entry {
    value: Arc<dyn Any + Send + Sync>,
    bytes: u64,
    hits: u64,
    last_used: Instant,
    last_used_unix: u64,
    /// `None`: kept until cleared.
    keep_until: Option<Instant>,
    users: BTreeSet<String>,
}

impl Entry {
    /// A running job holds a clone of the value.
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.value) > 1
    }
}

/// Whether a lookup found the component loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
}

/// What an unload removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleared {
    pub unloaded: u64,
    pub bytes_freed: u64,
}

/// A component that would be or was unloaded to make room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    pub key: ComponentKey,
    pub bytes: u64,
}

/// Components that cannot fit in the budget even after evicting every idle one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverBudget {
    pub needed: u64,
    pub in_use: u64,
    pub budget: u64,
}

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the run needs {} more, ", human_bytes(self.needed))?;
        if self.in_use > 0 {
            write!(f, "{} is held by running jobs, ", human_bytes(self.in_use))?;
        }
        write!(
            f,
            "and the memory budget is {} (--memory-budget); nothing was loaded",
            human_bytes(self.budget)
        )
    }
}

struct CacheState {
    entries: HashMap<ComponentKey, Entry>,
    budget: u64,
}

/// The daemon's loaded components. Cheap to clone; all clones share one cache.
#[derive(Clone)]
pub struct ComponentCache {
    state: Arc<Mutex<CacheState>>,
}

impl Default for ComponentCache {
    fn default() -> Self {
        Self::with_budget(u64::MAX)
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl ComponentCache {
    /// A cache whose components may take at most `budget` bytes together.
    pub fn with_budget(budget: u64) -> Self {
        ComponentCache {
            state: Arc::new(Mutex::new(CacheState {
                entries: HashMap::new(),
                budget,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // Every change is a single insert or removal, so a panic elsewhere cannot leave the
        // map half-written: a poisoned lock still guards a consistent cache.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn budget(&self) -> u64 {
        self.lock().budget
    }

    pub fn loaded_bytes(&self) -> u64 {
        self.lock().entries.values().map(|e| e.bytes).sum()
    }

    pub fn contains(&self, key: &ComponentKey) -> bool {
        self.lock().entries.contains_key(key)
    }

    /// [`ComponentCache::get_or_load_any`] with a typed value, for the tests.
    #[cfg(test)]
    pub fn get_or_load<T, E>(
        &self,
        key: ComponentKey,
        user: &str,
        load: impl FnOnce() -> Result<(T, u64), E>,
    ) -> Result<(Arc<T>, Lookup), E>
    where
        T: Send + Sync + 'static,
    {
        let (value, lookup) = self.get_or_load_any(key, user, || {
            load().map(|(v, bytes)| (Arc::new(v) as Arc<dyn Any + Send + Sync>, bytes))
        })?;
        let value = value
            .downcast::<T>()
            .expect("the tests keep one type per key");
        Ok((value, lookup))
    }

    /// Returns the component for `key`, loading it with `load` (which also reports its
    /// size in bytes) when it is not cached; records `user` (e.g. `workflow:step`) as one
    /// of its users. The lock is not held while loading. A loaded component replaces an
    /// idle copy of the same component at other file versions. The key's class says what
    /// type the value is.
    pub fn get_or_load_any<E>(
        &self,
        key: ComponentKey,
        user: &str,
        load: impl FnOnce() -> Result<(Arc<dyn Any + Send + Sync>, u64), E>,
    ) -> Result<(Arc<dyn Any + Send + Sync>, Lookup), E> {
        if let Some(entry) = self.lock().entries.get_mut(&key) {
            entry.hits += 1;
            entry.last_used = Instant::now();
            entry.last_used_unix = now_unix();
            if entry.users.len() < MAX_USERS_LISTED {
                entry.users.insert(user.to_string());
            }
            return Ok((Arc::clone(&entry.value), Lookup::Hit));
        }
        let (value, bytes) = load()?;
        let mut state = self.lock();
        let stale: Vec<ComponentKey> = state
            .entries
            .iter()
            .filter(|(k, e)| k.same_slot(&key) && !e.in_use())
            .map(|(k, _)| k.clone())
            .collect();
        for old in stale {
            state.entries.remove(&old);
            tracing::info!(component = old.component_type, model = %old.model.display(), "dropped a stale copy: its files changed on disk");
        }
        let entry = Entry {
            value: value.clone(),
            bytes,
            hits: 0,
            last_used: Instant::now(),
            last_used_unix: now_unix(),
            keep_until: None,
            users: BTreeSet::from([user.to_string()]),
        };
        state.entries.insert(key, entry);
        Ok((value, Lookup::Miss))
    }

    /// Which idle components would be unloaded, least recently used first, so that `needed`
    /// more bytes fit in the budget. Components in `keep` (the run's own) are not evicted.
    pub fn plan_room(
        &self,
        needed: u64,
        keep: &[ComponentKey],
    ) -> Result<Vec<Evicted>, OverBudget> {
        let state = self.lock();
        let loaded: u64 = state
            .entries
            .iter()
            .filter(|(k, _)| !k.host)
            .map(|(_, e)| e.bytes)
            .sum();
        let mut candidates: Vec<(&ComponentKey, &Entry)> = state
            .entries
            .iter()
            .filter(|(k, e)| !k.host && !e.in_use() && !keep.contains(k))
            .collect();
        candidates.sort_by_key(|(_, e)| e.last_used);
        let mut evict = Vec::new();
        let mut after = loaded;
        for (key, entry) in candidates {
            if after.saturating_add(needed) <= state.budget {
                break;
            }
            after -= entry.bytes;
            evict.push(Evicted {
                key: key.clone(),
                bytes: entry.bytes,
            });
        }
        if after.saturating_add(needed) > state.budget {
            let in_use = state
                .entries
                .iter()
                .filter(|(k, e)| !k.host && e.in_use())
                .map(|(_, e)| e.bytes)
                .sum();
            return Err(OverBudget {
                needed,
                in_use,
                budget: state.budget,
            });
        }
        Ok(evict)
    }

    /// Makes room for `needed` more bytes by unloading idle components (see
    /// [`Self::plan_room`]); returns what was unloaded.
    pub fn make_room(
        &self,
        needed: u64,
        keep: &[ComponentKey],
    ) -> Result<Vec<Evicted>, OverBudget> {
        let evict = self.plan_room(needed, keep)?;
        if !evict.is_empty() {
            let mut state = self.lock();
            for e in &evict {
                state.entries.remove(&e.key);
                tracing::info!(component = e.key.component_type, model = %e.key.model.display(), bytes = e.bytes, "unloaded to make room");
            }
            drop(state);
            release_freed_memory();
        }
        Ok(evict)
    }

    /// After a run: `keys` stay for `keep_alive` from now; zero unloads them at once
    /// (unless another job holds them).
    pub fn keep_alive(&self, keys: &[ComponentKey], keep_alive: KeepAlive) -> Cleared {
        let mut state = self.lock();
        let mut cleared = Cleared::default();
        for key in keys {
            let unload = match (state.entries.get_mut(key), keep_alive) {
                (None, _) => false,
                (Some(entry), KeepAlive::Forever) => {
                    entry.keep_until = None;
                    false
                }
                (Some(entry), KeepAlive::For(d)) if d.is_zero() => !entry.in_use(),
                (Some(entry), KeepAlive::For(d)) => {
                    entry.keep_until = Some(Instant::now() + d);
                    false
                }
            };
            if let Some(entry) = unload.then(|| state.entries.remove(key)).flatten() {
                cleared.unloaded += 1;
                cleared.bytes_freed += entry.bytes;
            }
        }
        drop(state);
        if cleared.unloaded > 0 {
            release_freed_memory();
        }
        cleared
    }

    /// Unloads components whose keep-alive has run out and that no job holds.
    pub fn expire(&self, now: Instant) -> Cleared {
        self.remove_where(|_, entry| {
            entry.keep_until.is_some_and(|until| until <= now) && !entry.in_use()
        })
    }

    /// Unloads every component, or only those of models whose folder matches `model`
    /// (the full path, or its last path component). A job that is using a component keeps
    /// it until it finishes; the memory is freed then.
    pub fn clear(&self, model: Option<&str>) -> Cleared {
        self.remove_where(|key, _| match model {
            None => true,
            Some(m) => key.model == Path::new(m) || key.model.file_name().is_some_and(|n| n == m),
        })
    }

    fn remove_where(&self, mut matches: impl FnMut(&ComponentKey, &Entry) -> bool) -> Cleared {
        let mut state = self.lock();
        let mut cleared = Cleared::default();
        state.entries.retain(|key, entry| {
            let remove = matches(key, entry);
            if remove {
                cleared.unloaded += 1;
                cleared.bytes_freed += entry.bytes;
                tracing::info!(component = key.component_type, model = %key.model.display(), bytes = entry.bytes, "unloaded");
            }
            !remove
        });
        drop(state);
        if cleared.unloaded > 0 {
            release_freed_memory();
        }
        cleared
    }

    /// What is loaded, largest first.
    pub fn report(&self) -> Vec<LoadedComponent> {
        let state = self.lock();
        let now = Instant::now();
        let unix_now = now_unix();
        let mut loaded: Vec<LoadedComponent> = state
            .entries
            .iter()
            .map(|(key, entry)| LoadedComponent {
                model: key.model.display().to_string(),
                component_type: key.component_type.to_string(),
                dtype: key.dtype.clone(),
                device: key.device.clone(),
                bytes: entry.bytes,
                hits: entry.hits,
                last_used_unix: entry.last_used_unix,
                keep_until_unix: entry
                    .keep_until
                    .map(|until| unix_now + until.saturating_duration_since(now).as_secs()),
                in_use: entry.in_use(),
                users: entry.users.iter().cloned().collect(),
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
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How often the daemon looks for components whose keep-alive ran out.
pub const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: &str, files: Vec<FileIdentity>) -> ComponentKey {
        ComponentKey {
            component_type: "unet",
            class: "UNet2DConditionModel",
            variant: None,
            adapters: Vec::new(),
            model: PathBuf::from(model),
            dtype: "f32".into(),
            device: "cpu".into(),
            files,
            host: false,
        }
    }

    fn typed(component_type: &'static str, model: &str) -> ComponentKey {
        ComponentKey {
            component_type,
            ..key(model, vec![])
        }
    }

    #[test]
    fn a_second_lookup_of_the_same_key_is_a_hit_and_does_not_load() {
        let cache = ComponentCache::default();
        let (a, first) = cache
            .get_or_load(key("/m", vec![]), "w:a", || Ok::<_, ()>((5u32, 100)))
            .unwrap();
        let (b, second) = cache
            .get_or_load(key("/m", vec![]), "w:b", || -> Result<(u32, u64), ()> {
                panic!("must not load again")
            })
            .unwrap();
        assert_eq!((first, second), (Lookup::Miss, Lookup::Hit));
        assert!(Arc::ptr_eq(&a, &b));
        let report = cache.report();
        assert_eq!(report[0].hits, 1);
        assert_eq!(report[0].users, ["w:a", "w:b"]);
        assert!(report[0].in_use, "a and b are still held");
    }

    #[test]
    fn a_changed_weight_file_loads_again_and_drops_the_stale_copy() {
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
            .get_or_load(key("/m", vec![old]), "u", || Ok::<_, ()>((1u8, 1)))
            .unwrap();
        let (_, lookup) = cache
            .get_or_load(key("/m", vec![new.clone()]), "u", || Ok::<_, ()>((2u8, 1)))
            .unwrap();
        assert_eq!(lookup, Lookup::Miss);
        assert_eq!(cache.len(), 1);
        assert!(cache.contains(&key("/m", vec![new])));
    }

    #[test]
    fn clear_reports_what_it_unloaded_and_can_target_one_model() {
        let cache = ComponentCache::default();
        cache
            .get_or_load(key("/a/sd15", vec![]), "u", || Ok::<_, ()>((1u8, 100)))
            .unwrap();
        cache
            .get_or_load(key("/b/other", vec![]), "u", || Ok::<_, ()>((1u8, 50)))
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
        let result = cache.get_or_load(key("/m", vec![]), "u", || Err::<(u8, u64), _>("broken"));
        assert_eq!(result.err(), Some("broken"));
        assert!(cache.is_empty());
    }

    #[test]
    fn room_is_made_by_evicting_idle_components_least_recently_used_first() {
        let cache = ComponentCache::with_budget(300);
        for name in ["/old", "/mid", "/new"] {
            cache
                .get_or_load(typed("unet", name), "u", || Ok::<_, ()>((0u8, 100)))
                .unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        let planned = cache.plan_room(150, &[]).unwrap();
        let models: Vec<_> = planned
            .iter()
            .map(|e| e.key.model.display().to_string())
            .collect();
        assert_eq!(models, ["/old", "/mid"]);
        assert_eq!(cache.len(), 3, "planning evicts nothing");
        cache.make_room(150, &[]).unwrap();
        assert_eq!(cache.len(), 1);
        assert!(cache.contains(&typed("unet", "/new")));
    }

    /// Model offload keeps components in host memory while the device is a GPU: they take
    /// none of the device's budget, and unloading them would free none of it.
    #[test]
    fn offloaded_components_in_host_memory_are_outside_the_device_budget() {
        let cache = ComponentCache::with_budget(300);
        let host = ComponentKey {
            host: true,
            ..typed("transformer", "/flux")
        };
        cache
            .get_or_load(host.clone(), "u", || Ok::<_, ()>((0u8, 250)))
            .unwrap();
        assert!(cache.plan_room(300, &[]).unwrap().is_empty());
        cache
            .get_or_load(typed("vae", "/flux"), "u", || Ok::<_, ()>((0u8, 200)))
            .unwrap();
        let evicted = cache.make_room(150, &[]).unwrap();
        assert_eq!(evicted.len(), 1);
        assert_eq!(
            evicted[0].key,
            typed("vae", "/flux"),
            "not the host-held one"
        );
        assert!(cache.contains(&host));
    }

    #[test]
    fn a_component_in_use_is_never_evicted_and_too_much_is_refused_with_the_sizes() {
        let cache = ComponentCache::with_budget(300);
        let (held, _) = cache
            .get_or_load(typed("unet", "/busy"), "u", || Ok::<_, ()>((0u8, 200)))
            .unwrap();
        cache
            .get_or_load(typed("vae", "/idle"), "u", || Ok::<_, ()>((0u8, 100)))
            .unwrap();
        let err = cache.make_room(150, &[]).unwrap_err();
        assert_eq!(
            err,
            OverBudget {
                needed: 150,
                in_use: 200,
                budget: 300
            }
        );
        assert!(err.to_string().contains(
            "needs 150 B more, 200 B is held by running jobs, and the memory budget is 300 B"
        ));
        assert_eq!(cache.len(), 2, "a refused plan evicts nothing");
        drop(held);
        let evicted = cache.make_room(150, &[]).unwrap();
        assert_eq!(evicted.len(), 1, "the older one alone makes enough room");
        assert_eq!(evicted[0].key, typed("unet", "/busy"));
    }

    #[test]
    fn keep_alive_zero_unloads_at_once_and_a_duration_expires_later() {
        let cache = ComponentCache::default();
        let a = typed("unet", "/a");
        let b = typed("vae", "/b");
        cache
            .get_or_load(a.clone(), "u", || Ok::<_, ()>((0u8, 10)))
            .unwrap();
        cache
            .get_or_load(b.clone(), "u", || Ok::<_, ()>((0u8, 20)))
            .unwrap();
        assert_eq!(
            cache.keep_alive(std::slice::from_ref(&a), KeepAlive::For(Duration::ZERO)),
            Cleared {
                unloaded: 1,
                bytes_freed: 10
            }
        );
        cache.keep_alive(
            std::slice::from_ref(&b),
            KeepAlive::For(Duration::from_secs(60)),
        );
        assert!(cache.report()[0].keep_until_unix.unwrap() >= now_unix() + 59);
        assert_eq!(cache.expire(Instant::now()), Cleared::default());
        assert_eq!(
            cache.expire(Instant::now() + Duration::from_secs(61)),
            Cleared {
                unloaded: 1,
                bytes_freed: 20
            }
        );
    }

    #[test]
    fn forever_is_never_expired() {
        let cache = ComponentCache::default();
        let a = typed("unet", "/a");
        cache
            .get_or_load(a.clone(), "u", || Ok::<_, ()>((0u8, 10)))
            .unwrap();
        cache.keep_alive(std::slice::from_ref(&a), KeepAlive::Forever);
        assert_eq!(
            cache.expire(Instant::now() + Duration::from_secs(1 << 30)),
            Cleared::default()
        );
        assert_eq!(cache.report()[0].keep_until_unix, None);
    }
}
