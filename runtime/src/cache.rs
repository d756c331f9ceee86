//! Caches for the deterministic prefix of the data pipeline (decoding, reorientation, resampling), and a
//! slice dataset that loads volumes through them on demand instead of holding the whole dataset in RAM.
//!
//! - [`MemoryCache`]: least-recently-used values under a byte budget. The bytes it holds never exceed the
//!   budget: room is made before a value goes in, and a value larger than the whole budget is handed to the
//!   caller without being kept. Concurrent requests for one key load it once; the others wait for it.
//! - [`DiskCache`]: one raw file per volume, named by a hash of the source files' paths, sizes and mtimes
//!   and of the pipeline prefix, written atomically (temporary file + rename), so it survives the process,
//!   and a changed source file (or prefix) misses instead of returning stale data.
//! - [`CachedSlices`]: 2D axial slices of a list of image/label pairs. The index comes from the NIfTI
//!   headers; a slice's volume is prepared on first use (or read from the disk cache) and kept in the
//!   memory cache. [`CachedSlices::window_order`] shuffles volumes, then slices within windows of a few
//!   volumes, so an epoch touches each volume in one stretch and a budget of a window's volumes suffices.
use crate::bids::BidsEntry;
use crate::data::{
    load_group, preprocess_entry, window_groups, window_item, window_seed, LoadedGroup,
    SamplingOptions, SliceSet, WindowGroup,
};
use crate::pipeline::{Phase, Pipeline};
use crate::sampling::{plan, select, Filters, SamplingMode, Window};
use crate::volume::{Affine, Reorientation};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use tch::{Kind, Tensor};

/// A value whose size the memory cache counts.
pub trait Weighed {
    fn bytes(&self) -> usize;
}

enum Slot<V> {
    /// A thread is loading it; others wait for [`MemoryCache::loaded`].
    Loading,
    Ready {
        value: Arc<V>,
        bytes: usize,
        last_used: u64,
    },
}

struct Lru<V> {
    slots: HashMap<String, Slot<V>>,
    held: usize,
    clock: u64,
}

/// Counters of a cache's activity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: usize,
    pub misses: usize,
    pub evictions: usize,
    /// Loaded values larger than the budget, used once and not kept.
    pub too_large: usize,
    /// The most bytes held at any moment.
    pub peak_bytes: usize,
}

/// See the module documentation.
pub struct MemoryCache<V> {
    budget: usize,
    lru: Mutex<Lru<V>>,
    loaded: Condvar,
    stats: Mutex<CacheStats>,
}

impl<V: Weighed> MemoryCache<V> {
    /// A cache holding at most `budget` bytes (`usize::MAX`: no limit, 0: nothing is kept).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            lru: Mutex::new(Lru {
                slots: HashMap::new(),
                held: 0,
                clock: 0,
            }),
            loaded: Condvar::new(),
            stats: Mutex::new(CacheStats::default()),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    fn lock(&self) -> MutexGuard<'_, Lru<V>> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, update: impl FnOnce(&mut CacheStats)) {
        update(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.lock().held
    }

    pub fn stats(&self) -> CacheStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys held, least recently used first.
    pub fn keys_by_age(&self) -> Vec<String> {
        let lru = self.lock();
        let mut keys: Vec<(u64, &String)> = lru
            .slots
            .iter()
            .filter_map(|(key, slot)| match slot {
                Slot::Ready { last_used, .. } => Some((*last_used, key)),
                Slot::Loading => None,
            })
            .collect();
        keys.sort();
        keys.into_iter().map(|(_, key)| key.clone()).collect()
    }

    /// The value of `key`, from the cache or from `load` (called without the lock held).
    pub fn get_or_load(&self, key: &str, load: impl FnOnce() -> Result<V>) -> Result<Arc<V>> {
        let mut lru = self.lock();
        loop {
            lru.clock += 1;
            let now = lru.clock;
            match lru.slots.get_mut(key) {
                Some(Slot::Ready {
                    value, last_used, ..
                }) => {
                    *last_used = now;
                    let value = Arc::clone(value);
                    drop(lru);
                    self.count(|s| s.hits += 1);
                    return Ok(value);
                }
                Some(Slot::Loading) => {
                    lru = self.loaded.wait(lru).unwrap_or_else(|p| p.into_inner());
                }
                None => break,
            }
        }
        lru.slots.insert(key.to_owned(), Slot::Loading);
        drop(lru);
        self.count(|s| s.misses += 1);
        let loaded = load();
        let mut lru = self.lock();
        lru.slots.remove(key);
        let value = match loaded {
            Ok(value) => Arc::new(value),
            Err(error) => {
                drop(lru);
                self.loaded.notify_all();
                return Err(error);
            }
        };
        let bytes = value.bytes();
        if bytes > self.budget {
            drop(lru);
            self.loaded.notify_all();
            self.count(|s| s.too_large += 1);
            return Ok(value);
        }
        let mut evicted = 0;
        while lru.held + bytes > self.budget {
            let oldest = lru
                .slots
                .iter()
                .filter_map(|(key, slot)| match slot {
                    Slot::Ready { last_used, .. } => Some((*last_used, key.clone())),
                    Slot::Loading => None,
                })
                .min();
            let Some((_, oldest)) = oldest else { break };
            if let Some(Slot::Ready { bytes, .. }) = lru.slots.remove(&oldest) {
                lru.held -= bytes;
                evicted += 1;
            }
        }
        lru.clock += 1;
        let last_used = lru.clock;
        lru.slots.insert(
            key.to_owned(),
            Slot::Ready {
                value: Arc::clone(&value),
                bytes,
                last_used,
            },
        );
        lru.held += bytes;
        let held = lru.held;
        drop(lru);
        self.loaded.notify_all();
        self.count(|s| {
            s.evictions += evicted;
            s.peak_bytes = s.peak_bytes.max(held);
        });
        Ok(value)
    }
}

/// One volume after the cached pipeline prefix: its axial slices, image as f32 and label as 0/1 bytes, both
/// `[slices, height, width]`, plus each slice's in-plane spacing.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedVolume {
    pub source: String,
    /// `[slices, height, width]`
    pub shape: [usize; 3],
    pub image: Vec<f32>,
    pub label: Vec<u8>,
    pub spacing: Vec<Vec<f64>>,
}

impl Weighed for PreparedVolume {
    fn bytes(&self) -> usize {
        self.image.len() * 4 + self.label.len()
    }
}

impl PreparedVolume {
    /// Slice `z` as `[1, H, W]` tensors (image, label as 0/1 floats).
    pub fn slice(&self, z: usize) -> (Tensor, Tensor) {
        let [_, height, width] = self.shape;
        let range = z * height * width..(z + 1) * height * width;
        let shape = [1, height as i64, width as i64];
        (
            Tensor::from_slice(&self.image[range.clone()]).view(shape),
            Tensor::from_slice(&self.label[range])
                .view(shape)
                .to_kind(Kind::Float),
        )
    }

    /// Runs `entry`'s axial slices through `pipeline` (see [`preprocess_entry`]).
    pub fn prepare(entry: &BidsEntry, pipeline: &Pipeline, phase: Phase) -> Result<Self> {
        let slices = preprocess_entry(entry, pipeline, phase, 0, 0)?;
        let source = entry.image.display().to_string();
        let Some((first, _, _)) = slices.first() else {
            bail!("{source}: no slices");
        };
        let plane = first.size();
        if plane.len() != 3 || plane[0] != 1 {
            bail!("{source}: preprocessed slices have shape {plane:?}, expected [1, H, W]");
        }
        let (height, width) = (plane[1] as usize, plane[2] as usize);
        let mut image = Vec::with_capacity(slices.len() * height * width);
        let mut label = Vec::with_capacity(slices.len() * height * width);
        let mut spacing = Vec::with_capacity(slices.len());
        for (z, (slice_image, slice_label, slice_spacing)) in slices.iter().enumerate() {
            if slice_image.size() != plane {
                bail!(
                    "{source}: slice {z} has shape {:?} after preprocessing, slice 0 {plane:?}",
                    slice_image.size()
                );
            }
            image.extend(Vec::<f32>::try_from(slice_image.contiguous().view(-1))?);
            label.extend(Vec::<u8>::try_from(
                slice_label.to_kind(Kind::Uint8).contiguous().view(-1),
            )?);
            spacing.push(slice_spacing.clone());
        }
        Ok(Self {
            source,
            shape: [slices.len(), height, width],
            image,
            label,
            spacing,
        })
    }
}

/// Hex sha256 of `text`.
fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Identifies a pipeline prefix in cache keys: its saved description and the phase it runs in.
pub fn prefix_hash(pipeline: &Pipeline, phase: Phase) -> String {
    sha256_hex(&format!(
        "{}\0{}",
        serde_json::Value::from(pipeline.specs()),
        phase.key()
    ))
}

/// `path`'s identity for a cache key: canonical path, size and modification time (ns).
fn file_identity(path: &Path) -> Result<String> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let modified = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    Ok(format!(
        "{}\0{}\0{modified}",
        canonical.display(),
        metadata.len()
    ))
}

/// The cache key of an image/label pair through a prefix: changes when either file or the prefix does.
pub fn entry_key(entry: &BidsEntry, prefix: &str) -> Result<String> {
    let mut identity = file_identity(&entry.image)?;
    if let Some(label) = &entry.label {
        identity.push('\0');
        identity.push_str(&file_identity(label)?);
    }
    Ok(sha256_hex(&format!("{identity}\0{prefix}")))
}

/// Opens a cache file written by `DiskCache::write_framed`: its header, the number of data bytes after the
/// frame, and a reader positioned at the data. `None` when it is missing, of another kind or unreadable.
fn open_framed<H: serde::de::DeserializeOwned>(
    path: &Path,
    magic: &[u8; 8],
) -> Option<(H, usize, std::io::BufReader<std::fs::File>)> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let file_len = file.metadata().ok()?.len() as usize;
    let mut reader = std::io::BufReader::new(file);
    let mut found = [0u8; 8];
    reader.read_exact(&mut found).ok()?;
    if &found != magic {
        return None;
    }
    let mut length = [0u8; 8];
    reader.read_exact(&mut length).ok()?;
    let header_len = u64::from_le_bytes(length) as usize;
    let mut header = vec![0u8; header_len.min(file_len)];
    reader.read_exact(&mut header).ok()?;
    let header: H = serde_json::from_slice(&header).ok()?;
    let data_len = file_len.checked_sub(16 + header_len)?;
    Some((header, data_len, reader))
}

const DISK_MAGIC: &[u8; 8] = b"IVADOVC1";

#[derive(serde::Serialize, serde::Deserialize)]
struct DiskHeader {
    source: String,
    shape: [usize; 3],
    spacing: Vec<Vec<f64>>,
}

/// See the module documentation. A file that is unreadable or of the wrong length counts as a miss.
#[derive(Clone, Debug)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.vol"))
    }

    /// The volume stored under `key`, if a complete one is there.
    /// Read straight into the volume's vectors: no second copy of the file in memory.
    pub fn load(&self, key: &str) -> Option<PreparedVolume> {
        use std::io::Read;
        let (header, data_len, mut reader) =
            open_framed::<DiskHeader>(&self.path(key), DISK_MAGIC)?;
        let count = header
            .shape
            .iter()
            .try_fold(1usize, |n, &s| n.checked_mul(s))?;
        if data_len != count * 5 || header.spacing.len() != header.shape[0] {
            return None;
        }
        let image = read_f32s(&mut reader, count)?;
        let mut label = vec![0u8; count];
        reader.read_exact(&mut label).ok()?;
        Some(PreparedVolume {
            source: header.source,
            shape: header.shape,
            image,
            label,
            spacing: header.spacing,
        })
    }

    /// Writes `volume` under `key` atomically, streaming its data (no serialised copy in memory).
    pub fn store(&self, key: &str, volume: &PreparedVolume) -> Result<()> {
        let header = DiskHeader {
            source: volume.source.clone(),
            shape: volume.shape,
            spacing: volume.spacing.clone(),
        };
        self.write_framed(
            key,
            &self.path(key),
            DISK_MAGIC,
            &header,
            &[&f32_bytes(&volume.image), &volume.label],
        )
    }

    /// Writes a cache file: `magic`, the JSON header's length (u64 LE), the header, then `data`
    /// ([`open_framed`] reads the frame back).
    fn write_framed(
        &self,
        key: &str,
        path: &Path,
        magic: &[u8; 8],
        header: &impl serde::Serialize,
        data: &[&[u8]],
    ) -> Result<()> {
        let header = serde_json::to_vec(header)?;
        let length = (header.len() as u64).to_le_bytes();
        let mut parts: Vec<&[u8]> = vec![magic, &length, &header];
        parts.extend_from_slice(data);
        self.write_parts(key, path, &parts)
    }

    /// Writes `parts` one after the other into a temporary file of the cache folder, then renames it to `path`.
    fn write_parts(&self, key: &str, path: &Path, parts: &[&[u8]]) -> Result<()> {
        use std::io::Write;
        let temporary = self.dir.join(format!(
            ".ivado-tmp-{key}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let write = || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&temporary)?);
            for part in parts {
                out.write_all(part)?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_data()?;
            std::fs::rename(&temporary, path)
        };
        write().map_err(|e| {
            std::fs::remove_file(&temporary).ok();
            anyhow::anyhow!("writing {}: {e}", path.display())
        })
    }
}

/// Where [`CachedSlices`] keeps prepared volumes.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// Bytes of prepared volumes kept in memory (`usize::MAX`: all of them).
    pub memory_budget: usize,
    /// A folder for prepared volumes on disk, read before preparing a volume again.
    pub disk: Option<PathBuf>,
}

/// The depth (canonical z) of a NIfTI volume, from its header alone.
fn axial_depth(path: &Path) -> Result<usize> {
    Ok(canonical_shape(path)?[2])
}

/// See the module documentation. Shared by loader workers (`Send + Sync`: it holds no tensor).
pub struct CachedSlices {
    entries: Vec<BidsEntry>,
    /// (volume, slice) of each slice index.
    slices: Vec<(usize, usize)>,
    /// Slice index range of each volume.
    ranges: Vec<std::ops::Range<usize>>,
    /// Cache key of each volume, from its files' identity when the set was made.
    keys: Vec<String>,
    prefix: Pipeline,
    rest: Pipeline,
    phase: Phase,
    memory: MemoryCache<PreparedVolume>,
    disk: Option<DiskCache>,
    /// Volumes prepared from their source files (neither cache had them).
    prepared: AtomicUsize,
}

impl CachedSlices {
    /// Indexes `entries` (each needs a label) from their headers. `prefix` is cached per volume; `rest` runs
    /// on every slice each time it is read. Both must be deterministic. Cache keys are taken now: a file
    /// changed while the set is in use is seen by the next set made.
    pub fn new(
        entries: Vec<BidsEntry>,
        prefix: Pipeline,
        rest: Pipeline,
        phase: Phase,
        options: &CacheOptions,
    ) -> Result<Self> {
        if entries.is_empty() {
            bail!("no images to load: the dataset split is empty");
        }
        let mut slices = Vec::new();
        let mut ranges = Vec::new();
        let prefix_hash = prefix_hash(&prefix, phase);
        let keys = entries
            .iter()
            .map(|entry| entry_key(entry, &prefix_hash))
            .collect::<Result<Vec<_>>>()?;
        for (volume, entry) in entries.iter().enumerate() {
            let depth = axial_depth(&entry.image)?;
            let start = slices.len();
            slices.extend((0..depth).map(|z| (volume, z)));
            ranges.push(start..slices.len());
        }
        Ok(Self {
            entries,
            keys,
            slices,
            ranges,
            prefix,
            rest,
            phase,
            memory: MemoryCache::new(options.memory_budget),
            disk: options.disk.clone().map(DiskCache::new).transpose()?,
            prepared: AtomicUsize::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.slices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }

    pub fn volumes(&self) -> usize {
        self.entries.len()
    }

    pub fn memory(&self) -> &MemoryCache<PreparedVolume> {
        &self.memory
    }

    /// Volumes prepared from their source files so far.
    pub fn prepared(&self) -> usize {
        self.prepared.load(Ordering::SeqCst)
    }

    /// Volume `index` after the prefix: from memory, else from the disk cache, else from its files.
    pub fn volume(&self, index: usize) -> Result<Arc<PreparedVolume>> {
        let entry = &self.entries[index];
        let key = &self.keys[index];
        self.memory.get_or_load(key, || {
            if let Some(volume) = self.disk.as_ref().and_then(|disk| disk.load(key)) {
                return Ok(volume);
            }
            let volume = PreparedVolume::prepare(entry, &self.prefix, self.phase)?;
            self.prepared.fetch_add(1, Ordering::SeqCst);
            let expected = self.ranges[index].len();
            if volume.shape[0] != expected {
                bail!(
                    "{}: {} slices after preprocessing, but its header says {expected}",
                    entry.image.display(),
                    volume.shape[0]
                );
            }
            if let Some(disk) = &self.disk {
                disk.store(key, &volume)?;
            }
            Ok(volume)
        })
    }

    /// Slice `index` through `rest`: `[1, H, W]` image, binary label, spacing.
    pub fn slice(&self, index: usize) -> Result<(Tensor, Tensor, Vec<f64>)> {
        let (volume_index, z) = self.slices[index];
        let volume = self.volume(volume_index)?;
        let (image, label) = volume.slice(z);
        let mut sample = ivado_sdk::Sample::new();
        sample.insert("image", image);
        sample.insert("label", label);
        sample.set_spacing(&volume.spacing[z]);
        let (sample, _) = self
            .rest
            .apply_in(self.phase, sample, 0)
            .with_context(|| format!("preprocessing slice {z} of {}", volume.source))?;
        Ok((
            sample.get("image")?.shallow_clone(),
            sample.get("label")?.ge(0.5).to_kind(Kind::Float),
            sample.spacing()?,
        ))
    }

    /// The slices at `indices` as a small [`SliceSet`] (slice `i` of it is `indices[i]`), for
    /// [`SliceSet::augmented_batch`].
    pub fn batch_set(&self, indices: &[i64]) -> Result<SliceSet> {
        let mut images = Vec::with_capacity(indices.len());
        let mut labels = Vec::with_capacity(indices.len());
        let mut spacing = Vec::with_capacity(indices.len());
        let mut volume_of_slice = Vec::with_capacity(indices.len());
        let mut volumes = Vec::new();
        for &index in indices {
            let (image, label, slice_spacing) = self.slice(index as usize)?;
            images.push(image);
            labels.push(label);
            spacing.push(slice_spacing);
            volume_of_slice.push(volumes.len());
            volumes.push(
                self.entries[self.slices[index as usize].0]
                    .image
                    .display()
                    .to_string(),
            );
        }
        Ok(SliceSet {
            images: crate::data::stack_samples(&images, "slices")?,
            labels: Tensor::stack(&labels, 0),
            volume_of_slice,
            volumes,
            spacing,
            metadata: None,
            available: None,
        })
    }

    /// Every slice once, in a seeded order that keeps memory local: volumes are shuffled, split into windows
    /// of `window` volumes, and the slices of each window shuffled together.
    pub fn window_order(&self, seed: u64, window: usize) -> Vec<i64> {
        windowed_order(&self.ranges, seed, window)
    }
}

/// A training set read lazily: what [`crate::loader::cached_batches`] and the trainer need of
/// [`CachedSlices`] and [`CachedWindows`].
pub trait LazySamples: Send + Sync {
    /// Samples in the set.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every sample once, in a seeded order that touches `window` volumes at a time.
    fn window_order(&self, seed: u64, window: usize) -> Vec<i64>;
    /// The samples at `indices` as a small [`SliceSet`] (sample `i` of it is `indices[i]`).
    fn batch_set(&self, indices: &[i64]) -> Result<SliceSet>;
    /// The memory cache's counters.
    fn cache_stats(&self) -> CacheStats;
    /// Bytes the memory cache holds now.
    fn cache_held(&self) -> usize;
}

impl LazySamples for CachedSlices {
    fn len(&self) -> usize {
        CachedSlices::len(self)
    }
    fn window_order(&self, seed: u64, window: usize) -> Vec<i64> {
        CachedSlices::window_order(self, seed, window)
    }
    fn batch_set(&self, indices: &[i64]) -> Result<SliceSet> {
        CachedSlices::batch_set(self, indices)
    }
    fn cache_stats(&self) -> CacheStats {
        self.memory.stats()
    }
    fn cache_held(&self) -> usize {
        self.memory.held()
    }
}

/// Shuffles `ranges` (one per volume) in groups of `window` volumes, then the samples of each group together.
fn windowed_order(ranges: &[std::ops::Range<usize>], seed: u64, window: usize) -> Vec<i64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut volumes: Vec<usize> = (0..ranges.len()).collect();
    volumes.shuffle(&mut rng);
    let mut order = Vec::with_capacity(ranges.last().map_or(0, |r| r.end));
    for group in volumes.chunks(window.max(1)) {
        let start = order.len();
        for &volume in group {
            order.extend(ranges[volume].clone().map(|i| i as i64));
        }
        order[start..].shuffle(&mut rng);
    }
    order
}

/// One group (an image, or a subject's contrasts) assembled, as [`CachedWindows`] keeps it: input
/// `[C, X, Y, Z]` and targets `[K, X, Y, Z]` as f32 (soft targets stay soft), and the grid's spacing.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedGroup {
    pub source: String,
    pub input_shape: [i64; 4],
    pub target_shape: [i64; 4],
    pub input: Vec<f32>,
    pub target: Vec<f32>,
    pub spacing: Vec<f64>,
}

impl Weighed for PreparedGroup {
    fn bytes(&self) -> usize {
        (self.input.len() + self.target.len()) * 4
    }
}

fn shape4(tensor: &Tensor, what: &str, source: &str) -> Result<[i64; 4]> {
    let size = tensor.size();
    size.as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("{source}: the {what} has shape {size:?}, expected 4 axes"))
}

impl PreparedGroup {
    fn from_loaded(source: String, loaded: &LoadedGroup) -> Result<Self> {
        let input = loaded.input.to_kind(Kind::Float).contiguous();
        let target = loaded.target.to_kind(Kind::Float).contiguous();
        Ok(Self {
            input_shape: shape4(&input, "input", &source)?,
            target_shape: shape4(&target, "target", &source)?,
            input: Vec::<f32>::try_from(input.view(-1))?,
            target: Vec::<f32>::try_from(target.view(-1))?,
            spacing: loaded.spacing.clone(),
            source,
        })
    }

    /// Runs `use_group` on tensors that borrow this group's data (no copy of the volume).
    fn with_tensors<R>(&self, use_group: impl FnOnce(&LoadedGroup) -> Result<R>) -> Result<R> {
        // SAFETY: the vectors hold exactly the shapes' element counts (checked when made or read back) and
        // outlive `use_group`, which only reads them: `window_item` copies each window out before anything
        // else sees it, so no tensor aliasing them survives this call.
        let borrow = |data: &[f32], shape: &[i64; 4]| unsafe {
            Tensor::from_blob(
                data.as_ptr().cast(),
                shape,
                &[],
                Kind::Float,
                tch::Device::Cpu,
            )
        };
        use_group(&LoadedGroup {
            input: borrow(&self.input, &self.input_shape),
            target: borrow(&self.target, &self.target_shape),
            roi: None,
            spacing: self.spacing.clone(),
            // The lazy path carries no availability mask: training refuses `cache` with a HeMIS model.
            missing_modalities: Tensor::zeros(
                [self.input_shape[0]],
                (Kind::Float, tch::Device::Cpu),
            ),
        })
    }
}

const DISK_GROUP_MAGIC: &[u8; 8] = b"IVADOWG1";

#[derive(serde::Serialize, serde::Deserialize)]
struct DiskGroupHeader {
    source: String,
    input_shape: [i64; 4],
    target_shape: [i64; 4],
    spacing: Vec<f64>,
}

fn element_count(shape: &[i64; 4]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &s| n.checked_mul(usize::try_from(s).ok()?))
}

/// The bytes of `values` as stored on disk (little-endian f32), without a copy on little-endian machines.
fn f32_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: any f32 is 4 initialised bytes; the slice covers exactly `values`.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), values.len() * 4)
        })
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Reads `count` little-endian f32 straight into the returned vector (no intermediate byte buffer).
fn read_f32s(reader: &mut impl std::io::Read, count: usize) -> Option<Vec<f32>> {
    let mut values = vec![0f32; count];
    // SAFETY: the byte view covers exactly the vector's initialised elements, and every bit pattern is a
    // valid f32.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), count * 4) };
    reader.read_exact(bytes).ok()?;
    if cfg!(target_endian = "big") {
        for value in &mut values {
            *value = f32::from_bits(value.to_bits().swap_bytes());
        }
    }
    Some(values)
}

impl DiskCache {
    fn group_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.grp"))
    }

    /// The group stored under `key`, if a complete one is there (read without a second buffer).
    pub fn load_group(&self, key: &str) -> Option<PreparedGroup> {
        let (header, data_len, mut reader) =
            open_framed::<DiskGroupHeader>(&self.group_path(key), DISK_GROUP_MAGIC)?;
        let inputs = element_count(&header.input_shape)?;
        let targets = element_count(&header.target_shape)?;
        if data_len != (inputs + targets) * 4 || header.spacing.len() != 3 {
            return None;
        }
        Some(PreparedGroup {
            input: read_f32s(&mut reader, inputs)?,
            target: read_f32s(&mut reader, targets)?,
            source: header.source,
            input_shape: header.input_shape,
            target_shape: header.target_shape,
            spacing: header.spacing,
        })
    }

    /// Writes `group` under `key` atomically, streaming its data (no serialised copy in memory).
    pub fn store_group(&self, key: &str, group: &PreparedGroup) -> Result<()> {
        let header = DiskGroupHeader {
            source: group.source.clone(),
            input_shape: group.input_shape,
            target_shape: group.target_shape,
            spacing: group.spacing.clone(),
        };
        self.write_framed(
            key,
            &self.group_path(key),
            DISK_GROUP_MAGIC,
            &header,
            &[&f32_bytes(&group.input), &f32_bytes(&group.target)],
        )
    }
}

/// The canonical (RAS) shape of a NIfTI volume, from its header alone.
pub fn canonical_shape(path: &Path) -> Result<[usize; 3]> {
    let header = nifti::NiftiHeader::from_file(path)
        .with_context(|| format!("failed to read the NIfTI header of {}", path.display()))?;
    let mut file_shape = [1usize; 3];
    for (axis, size) in header.dim[1..=3].iter().enumerate() {
        if axis < header.dim[0] as usize {
            file_shape[axis] = (*size).max(1) as usize;
        }
    }
    let matrix = header.affine::<f64>();
    let affine: Affine = std::array::from_fn(|r| std::array::from_fn(|c| matrix[(r, c)]));
    let reorientation = Reorientation::from_affine(&affine, file_shape)
        .with_context(|| format!("{}: orientation", path.display()))?;
    Ok(reorientation.canonical_shape())
}

/// One sample of [`CachedWindows`]: its group, its window and its pipeline seed.
struct WindowSample {
    group: usize,
    window: Window,
    seed: u64,
}

/// Every sampling mode read lazily: 2D slices on any axis, 2D patches, 3D subvolumes and whole volumes of
/// one- or multi-channel inputs with K targets, exactly the samples of [`SliceSet::build_windows`] (same
/// windows, same pipeline seeds). A group (see [`crate::data::WindowGroup`]) is assembled on first use, kept
/// in the memory cache under its budget (and on disk when asked), and each window is cut from it and run
/// through the whole pipeline when read.
///
/// Windows are planned from the NIfTI headers when no filter applies (3D modes, or 2D without slice/ROI/
/// training-time patch filters). Filters need the voxels, so then each group is read once up front, one at
/// a time, and left in the caches.
pub struct CachedWindows {
    groups: Vec<WindowGroup>,
    keys: Vec<String>,
    samples: Vec<WindowSample>,
    /// Sample index range of each kept group (skipped groups have none).
    ranges: Vec<std::ops::Range<usize>>,
    /// Image path of each kept group, and the group it is.
    volumes: Vec<(String, usize)>,
    /// The spatial shape the header promised, checked when the group is read.
    planned_shapes: Vec<Option<[i64; 3]>>,
    pipeline: Pipeline,
    phase: Phase,
    soft_gt: bool,
    memory: MemoryCache<PreparedGroup>,
    disk: Option<DiskCache>,
    prepared: AtomicUsize,
}

/// Whether `select` would drop any window of `mode` under `filters` (else the windows follow from the shape).
fn filters_apply(mode: &SamplingMode, filters: &Filters, training: bool) -> bool {
    let slice = filters.slice;
    let patch = filters.patch;
    match mode {
        SamplingMode::Subvolumes { .. } | SamplingMode::Volume => false,
        SamplingMode::Slices { .. } | SamplingMode::Patches2D { .. } => {
            slice.filter_empty_mask
                || slice.filter_absent_class
                || slice.filter_empty_input
                || filters.slice_filter_roi.is_some()
                || (training
                    && matches!(mode, SamplingMode::Patches2D { .. })
                    && (patch.filter_empty_mask
                        || patch.filter_absent_class
                        || patch.filter_empty_input))
        }
    }
}

impl CachedWindows {
    /// Indexes `entries` cut as `sampling` says; `pipeline`'s `phase` steps run on each window when it is
    /// read, seeded as [`SliceSet::build_windows`] seeds them from `seed`.
    pub fn new(
        entries: &[BidsEntry],
        pipeline: Pipeline,
        phase: Phase,
        seed: u64,
        sampling: &SamplingOptions,
        options: &CacheOptions,
    ) -> Result<Self> {
        let groups = window_groups(entries, sampling)?;
        // The assembly depends on the channel parameters; the window pipeline is not cached.
        let assembly = sha256_hex(&format!("{:?}", sampling.soft_gt));
        let keys = groups
            .iter()
            .map(|group| {
                let mut identity = format!("{:?}", group.params.contrasts);
                for entry in &group.entries {
                    identity.push('\0');
                    identity.push_str(&entry_key(entry, &assembly)?);
                    for target in entry.targets.iter().flatten() {
                        identity.push('\0');
                        identity.push_str(&file_identity(target)?);
                    }
                }
                Ok(sha256_hex(&identity))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut set = Self {
            keys,
            samples: Vec::new(),
            ranges: Vec::new(),
            volumes: Vec::new(),
            planned_shapes: vec![None; groups.len()],
            pipeline,
            phase,
            soft_gt: sampling.soft_gt,
            memory: MemoryCache::new(options.memory_budget),
            disk: options.disk.clone().map(DiskCache::new).transpose()?,
            prepared: AtomicUsize::new(0),
            groups,
        };
        let training = phase == Phase::Training;
        let from_headers = !filters_apply(&sampling.mode, &sampling.filters, training);
        for g in 0..set.groups.len() {
            let group = &set.groups[g];
            let windows = if from_headers {
                if group.skipped() {
                    continue;
                }
                let first = group
                    .params
                    .contrasts
                    .iter()
                    .find_map(|c| group.entries.iter().find(|e| &e.contrast == c))
                    .context("a group without images")?;
                let shape = canonical_shape(&first.image)?.map(|s| s as i64);
                set.planned_shapes[g] = Some(shape);
                plan(&sampling.mode, shape)?
            } else {
                let Some(loaded) = load_group(group)? else {
                    continue;
                };
                let windows = select(
                    &sampling.mode,
                    &loaded.input,
                    Some(&loaded.target),
                    loaded.roi.as_ref(),
                    &sampling.filters,
                    training,
                )?;
                let prepared = PreparedGroup::from_loaded(
                    group.entries[0].image.display().to_string(),
                    &loaded,
                )?;
                drop(loaded);
                set.prepared.fetch_add(1, Ordering::SeqCst);
                if let Some(disk) = &set.disk {
                    disk.store_group(&set.keys[g], &prepared)?;
                }
                set.memory.get_or_load(&set.keys[g], || Ok(prepared))?;
                windows
            };
            let volume = set.volumes.len();
            let start = set.samples.len();
            set.samples
                .extend(
                    windows
                        .into_iter()
                        .enumerate()
                        .map(|(index, window)| WindowSample {
                            group: g,
                            window,
                            seed: window_seed(seed, volume, index),
                        }),
                );
            set.ranges.push(start..set.samples.len());
            set.volumes
                .push((set.groups[g].entries[0].image.display().to_string(), g));
        }
        if set.samples.is_empty() {
            bail!("no sample left to train on: every subject was skipped or every window filtered out");
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Every sample once: groups shuffled, then the samples of `window` groups at a time together.
    pub fn window_order(&self, seed: u64, window: usize) -> Vec<i64> {
        windowed_order(&self.ranges, seed, window)
    }

    /// Groups with at least one sample.
    pub fn volumes(&self) -> usize {
        self.volumes.len()
    }

    pub fn memory(&self) -> &MemoryCache<PreparedGroup> {
        &self.memory
    }

    /// Groups assembled from their source files so far.
    pub fn prepared(&self) -> usize {
        self.prepared.load(Ordering::SeqCst)
    }

    /// Group `index` assembled: from memory, else from the disk cache, else from its files.
    pub fn group(&self, index: usize) -> Result<Arc<PreparedGroup>> {
        let group = &self.groups[index];
        let key = &self.keys[index];
        let source = group.entries[0].image.display().to_string();
        self.memory.get_or_load(key, || {
            if let Some(prepared) = self.disk.as_ref().and_then(|disk| disk.load_group(key)) {
                return Ok(prepared);
            }
            let loaded = load_group(group)?.with_context(|| {
                format!("{source}: skipped when read, though its files were there when indexed")
            })?;
            let prepared = PreparedGroup::from_loaded(source.clone(), &loaded)?;
            drop(loaded);
            self.prepared.fetch_add(1, Ordering::SeqCst);
            if let Some(planned) = self.planned_shapes[index] {
                if prepared.input_shape[1..] != planned {
                    bail!(
                        "{source}: read as {:?}, but its header says {planned:?}",
                        &prepared.input_shape[1..]
                    );
                }
            }
            if let Some(disk) = &self.disk {
                disk.store_group(key, &prepared)?;
            }
            Ok(prepared)
        })
    }

    /// Sample `index`: its window through the pipeline (image, label, spacing).
    pub fn sample(&self, index: usize) -> Result<(Tensor, Tensor, Vec<f64>)> {
        let sample = &self.samples[index];
        let group = self.group(sample.group)?;
        group.with_tensors(|loaded| {
            window_item(
                loaded,
                &sample.window,
                &self.pipeline,
                self.phase,
                sample.seed,
                self.soft_gt,
                &self.groups[sample.group].entries[0],
            )
        })
    }
}

impl LazySamples for CachedWindows {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn window_order(&self, seed: u64, window: usize) -> Vec<i64> {
        windowed_order(&self.ranges, seed, window)
    }

    fn batch_set(&self, indices: &[i64]) -> Result<SliceSet> {
        let mut images = Vec::with_capacity(indices.len());
        let mut labels = Vec::with_capacity(indices.len());
        let mut spacing = Vec::with_capacity(indices.len());
        let mut volumes = Vec::with_capacity(indices.len());
        for &index in indices {
            let (image, label, sample_spacing) = self.sample(index as usize)?;
            images.push(image);
            labels.push(label);
            spacing.push(sample_spacing);
            let group = self.samples[index as usize].group;
            volumes.push(self.groups[group].entries[0].image.display().to_string());
        }
        Ok(SliceSet {
            images: crate::data::stack_samples(&images, "samples")?,
            labels: Tensor::stack(&labels, 0),
            volume_of_slice: (0..indices.len()).collect(),
            volumes,
            spacing,
            metadata: None,
            available: None,
        })
    }

    fn cache_stats(&self) -> CacheStats {
        self.memory.stats()
    }

    fn cache_held(&self) -> usize {
        self.memory.held()
    }
}
