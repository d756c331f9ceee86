//! Hot reload (`ivado watch`): live pipelines whose steps are swapped when their source files change.
//!
//! Each registered [`LivePipeline`] is watched through the files its steps come from: the Rhai file of a
//! script step, the library file of a plugin step. On a change:
//! - a script is recompiled and each step using it gets the new version (its previous version stays as a
//!   fallback if the new one fails at run time);
//! - a library is copied to a private file and loaded from there, because dlopen caches by path and inode and
//!   the build overwrites the original; the steps from it are re-created with the same configs. The old
//!   library stays mapped while any step or running batch holds it.
//!
//! The new pipeline is swapped in with [`LivePipeline::replace`], so the next batch uses it. A broken version
//! (syntax error, missing function, unloadable library, rejected config) is reported and changes nothing.
//!
//! Editors save by writing a temporary file and renaming it over the original, which replaces the inode, so the
//! watcher watches the *parent directories* and filters by path. Reading a file makes inotify report an access,
//! and several writes can arrive as several batches, so access events are ignored and a file reloads only
//! when its content hash changed.
use crate::pipeline::{LivePipeline, Pipeline, Step, StepTransform, WeakLivePipeline};
use crate::plugin::{PluginLibrary, PluginTransform};
use anyhow::{Context, Result};
use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Quiet time before a burst of file events is handled (a build writes a library in several steps).
const DEBOUNCE: Duration = Duration::from_millis(250);

/// Watches the source files of registered live pipelines and reloads their steps when the files change.
pub struct Watcher {
    shared: Arc<Shared>,
    debouncer: Mutex<Debouncer<notify::RecommendedWatcher, RecommendedCache>>,
}

struct Shared {
    state: Mutex<State>,
    /// Where private copies of rebuilt libraries are loaded from (made on first use, removed with the watcher).
    private_dir: PathBuf,
    copies: AtomicU64,
}

#[derive(Default)]
struct State {
    pipelines: Vec<Watched>,
    /// Content hash of each watched file as last loaded (or last rejected, so a broken file is reported once).
    hashes: HashMap<PathBuf, u64>,
    directories: HashSet<PathBuf>,
}

struct Watched {
    label: String,
    live: WeakLivePipeline,
    /// Per step: the file it comes from.
    origins: Vec<PathBuf>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// An absolute path with a canonical parent directory, the form event paths take.
fn watch_key(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => dir
            .canonicalize()
            .map(|dir| dir.join(name))
            .unwrap_or(absolute),
        _ => absolute,
    }
}

/// The file a step comes from: its script, or its plugin library.
fn origin(step: &Step) -> PathBuf {
    match &step.transform {
        StepTransform::Script(script) => script.path().to_owned(),
        StepTransform::Plugin(transform) => transform.library().path.clone(),
    }
}

impl Watcher {
    pub fn new() -> Result<Self> {
        static WATCHERS: AtomicU64 = AtomicU64::new(0);
        let private_dir = std::env::temp_dir().join(format!(
            "ivado-reload-{}-{}",
            std::process::id(),
            WATCHERS.fetch_add(1, Ordering::Relaxed)
        ));
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            private_dir,
            copies: AtomicU64::new(0),
        });
        let handler = {
            let shared = Arc::clone(&shared);
            move |result: DebounceEventResult| shared.handle(result)
        };
        let debouncer =
            new_debouncer(DEBOUNCE, None, handler).context("cannot start the file watcher")?;
        Ok(Self {
            shared,
            debouncer: Mutex::new(debouncer),
        })
    }

    /// Watches the files `live`'s steps come from. `label` names the pipeline in logs (e.g. "augment").
    pub fn register(&self, label: &str, live: &LivePipeline) -> Result<()> {
        let pipeline = live.current();
        let origins: Vec<PathBuf> = pipeline
            .steps
            .iter()
            .map(|s| watch_key(&origin(s)))
            .collect();
        let mut hashes = Vec::new();
        for (step, file) in pipeline.steps.iter().zip(&origins) {
            // What runs now is the baseline: a script's compiled text, a library's file as it is.
            let hash = match &step.transform {
                StepTransform::Script(script) => content_hash(script.source().as_bytes()),
                StepTransform::Plugin(_) => match std::fs::read(file) {
                    Ok(bytes) => content_hash(&bytes),
                    Err(_) => continue,
                },
            };
            hashes.push((file.clone(), hash));
        }
        let directories: BTreeSet<PathBuf> = origins
            .iter()
            .filter_map(|file| file.parent().map(Path::to_path_buf))
            .collect();
        // The watch call runs without the state lock: the event thread takes that lock while handling events.
        let new_directories: Vec<PathBuf> = {
            let state = lock(&self.shared.state);
            directories
                .into_iter()
                .filter(|dir| !state.directories.contains(dir))
                .collect()
        };
        {
            let mut debouncer = lock(&self.debouncer);
            for dir in &new_directories {
                debouncer
                    .watch(dir, RecursiveMode::NonRecursive)
                    .with_context(|| format!("cannot watch {}", dir.display()))?;
            }
        }
        let mut state = lock(&self.shared.state);
        state.directories.extend(new_directories);
        for (file, hash) in hashes {
            state.hashes.entry(file).or_insert(hash);
        }
        let files: BTreeSet<String> = origins.iter().map(|f| f.display().to_string()).collect();
        tracing::info!(
            "watching {} for the {label} pipeline: {}",
            if files.len() == 1 { "1 file" } else { "files" },
            files.into_iter().collect::<Vec<_>>().join(", ")
        );
        state.pipelines.push(Watched {
            label: label.to_owned(),
            live: live.downgrade(),
            origins,
        });
        Ok(())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.shared.private_dir);
    }
}

/// The new step for each (pipeline, step index) that comes from a changed file.
type Replacements = Vec<(usize, Vec<(usize, Step)>)>;

impl Shared {
    fn handle(&self, result: DebounceEventResult) {
        let events = match result {
            Ok(events) => events,
            Err(errors) => {
                for error in errors {
                    tracing::warn!("file watcher: {error}");
                }
                return;
            }
        };
        let paths: BTreeSet<PathBuf> = events
            .iter()
            .filter(|event| !matches!(event.kind, EventKind::Access(_)))
            .flat_map(|event| event.paths.iter().cloned())
            .collect();
        let mut state = lock(&self.state);
        state.pipelines.retain(|w| w.live.upgrade().is_some());
        for path in paths {
            if state.hashes.contains_key(&path) {
                self.reload(&mut state, &path);
            }
        }
    }

    fn reload(&self, state: &mut State, file: &Path) {
        // Missing while an editor renames a new version into place: the rename brings another event.
        let Ok(bytes) = std::fs::read(file) else {
            return;
        };
        let hash = content_hash(&bytes);
        if state.hashes.insert(file.to_owned(), hash) == Some(hash) {
            return;
        }
        let users: Vec<(usize, LivePipeline, Vec<usize>)> = state
            .pipelines
            .iter()
            .enumerate()
            .filter_map(|(index, watched)| {
                let steps: Vec<usize> = (0..watched.origins.len())
                    .filter(|&i| watched.origins[i] == file)
                    .collect();
                let live = watched.live.upgrade()?;
                (!steps.is_empty()).then_some((index, live, steps))
            })
            .collect();
        if users.is_empty() {
            return;
        }
        let built = self.rebuild(file, &bytes, &users);
        let (replacements, library) = match built {
            Ok(built) => built,
            Err(error) => {
                tracing::error!(
                    "{error:#}\n{} was not reloaded: the previous version keeps running",
                    file.display()
                );
                return;
            }
        };
        let mut changed = Vec::new();
        for (index, steps) in replacements {
            let (_, live, _) = users
                .iter()
                .find(|(i, ..)| *i == index)
                .expect("replacements come from users");
            let mut pipeline: Pipeline = (*live.current()).clone();
            let mut names = Vec::new();
            for (step_index, step) in steps {
                names.push(format!("step {} {}", step_index + 1, step.label()));
                pipeline.steps[step_index] = step;
            }
            live.replace(pipeline);
            changed.push(format!(
                "{} pipeline: {}",
                state.pipelines[index].label,
                names.join(", ")
            ));
        }
        let version = library
            .map(|l| format!(" (plugin `{}` {})", l.name, l.version))
            .unwrap_or_default();
        tracing::info!(
            "reloaded {}{version}: the next batch uses the new version ({})",
            file.display(),
            changed.join("; ")
        );
    }

    /// Builds every replacement step, or fails as a whole. Also returns the new library for a plugin file.
    fn rebuild(
        &self,
        file: &Path,
        bytes: &[u8],
        users: &[(usize, LivePipeline, Vec<usize>)],
    ) -> Result<(Replacements, Option<Arc<PluginLibrary>>)> {
        let mut library: Option<Arc<PluginLibrary>> = None;
        let mut replacements = Vec::new();
        for (index, live, steps) in users {
            let pipeline = live.current();
            let mut rebuilt = Vec::new();
            for &step_index in steps {
                let step = &pipeline.steps[step_index];
                let transform = match &step.transform {
                    StepTransform::Script(script) => {
                        let source = String::from_utf8(bytes.to_vec())
                            .with_context(|| format!("{}: not UTF-8 text", file.display()))?;
                        StepTransform::Script(Arc::new(script.reloaded(source)?))
                    }
                    StepTransform::Plugin(transform) => {
                        let library = match &library {
                            Some(library) => Arc::clone(library),
                            None => {
                                let loaded = self.load_private_copy(file, bytes)?;
                                library = Some(Arc::clone(&loaded));
                                loaded
                            }
                        };
                        StepTransform::Plugin(Arc::new(PluginTransform::create(
                            library,
                            &transform.name,
                            &transform.config,
                        )?))
                    }
                };
                rebuilt.push((
                    step_index,
                    Step {
                        transform,
                        options: step.options.clone(),
                    },
                ));
            }
            replacements.push((*index, rebuilt));
        }
        Ok((replacements, library))
    }

    /// Loads `bytes` (the library's new content) from a file of its own.
    fn load_private_copy(&self, file: &Path, bytes: &[u8]) -> Result<Arc<PluginLibrary>> {
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let extension = file
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_else(|| "so".into());
        let copy = self.private_dir.join(format!(
            "{stem}-{}.{extension}",
            self.copies.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&self.private_dir)
            .and_then(|()| std::fs::write(&copy, bytes))
            .with_context(|| format!("copying to {}", copy.display()))?;
        let loaded = PluginLibrary::load(&copy);
        // A loaded library stays mapped without its file; unlinking now leaves nothing behind even if the
        // process is killed.
        let _ = std::fs::remove_file(&copy);
        let library = loaded.with_context(|| {
            format!("loading the new {} (from its private copy)", file.display())
        })?;
        tracing::debug!(
            "loaded {} (`{}` {}) from its private copy {}",
            file.display(),
            library.name,
            library.version,
            copy.display()
        );
        Ok(library)
    }
}
