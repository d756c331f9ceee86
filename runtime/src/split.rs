//! Train / validation / test splits with ivadomed's `split_dataset` semantics.
//!
//! Entries are grouped by a split column (`split_method`): `participant_id` (the default: one subject never
//! spans two sets), `sample_id` (microscopy samples), or any metadata column such as `institution_id` (every
//! entry of one centre lands in the same set, so a centre can be held out). The test set is either the groups
//! of the `data_testing` column whose values are listed in `data_value`, or a random `test_fraction` of that
//! column's values (at least one); the remaining groups are split into training and validation so that
//! training gets `train_fraction` of all groups.
//!
//! The random draws reproduce ivadomed's exactly: scikit-learn's `train_test_split` sizes (`floor` of
//! fraction × count for the part it calls "train") over a numpy `RandomState(seed).permutation`, whose
//! Mersenne Twister and bounded-integer draw are reimplemented here. Same seed, same entries: the same split
//! ivadomed would make.
//!
//! Every split can be written as `split_datasets.json` (`{"split_method", "train", "valid", "test"}`: group
//! ids, ivadomed's `split_datasets.joblib` as JSON) and read back with `fname_split`. An entry whose group
//! is divided between sets (possible when `data_testing` uses another column than `split_method`) is listed
//! by its image file name instead, as ivadomed lists every entry, so reading the file back always gives the
//! same split. Ids that match nothing in the dataset are refused by name.
use crate::bids::BidsEntry;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The split file's name, as ivadomed's (`split_datasets.joblib`) with a JSON extension.
pub const SPLIT_FILE_NAME: &str = "split_datasets.json";

/// Train / validation / test entries.
#[derive(Clone, Debug, Default)]
pub struct Split {
    pub train: Vec<BidsEntry>,
    pub valid: Vec<BidsEntry>,
    pub test: Vec<BidsEntry>,
}

/// ivadomed's `data_testing`: force the entries whose `data_type` column has one of `data_value` into the
/// test set. `data_type` None means the split column; an empty `data_value` draws `test_fraction` of the
/// values at random.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataTesting {
    pub data_type: Option<String>,
    pub data_value: Vec<String>,
}

/// ivadomed's `split_dataset` parameters (minus `balance`).
#[derive(Clone, Debug, PartialEq)]
pub struct SplitParams {
    /// column whose values are kept together: `participant_id`, `sample_id` or a metadata column
    pub split_method: String,
    pub train_fraction: f64,
    /// validation gets what train and test leave
    pub test_fraction: f64,
    /// numpy's seed range: 0..=2^32-1
    pub random_seed: u64,
    pub data_testing: DataTesting,
    /// read the split from this file instead of drawing it
    pub fname_split: Option<PathBuf>,
}

impl Default for SplitParams {
    /// ivadomed's configuration defaults.
    fn default() -> Self {
        SplitParams {
            split_method: "participant_id".into(),
            train_fraction: 0.6,
            test_fraction: 0.2,
            random_seed: 6,
            data_testing: DataTesting::default(),
            fname_split: None,
        }
    }
}

/// The value of `column` for `entry`: `participant_id` is the subject folder name, `session_id` the session
/// folder name, anything else comes from the entry's metadata (tsv columns and sidecar fields). Empty and
/// `n/a` cells count as missing, as pandas reads them.
pub fn group_value(entry: &BidsEntry, column: &str) -> Option<String> {
    let value = match column {
        "participant_id" => Some(entry.subject.clone()),
        "session_id" => entry.session.clone(),
        _ => entry.metadata.get(column).cloned(),
    }?;
    let trimmed = value.trim();
    if trimmed.is_empty() || trimmed == "n/a" {
        None
    } else {
        Some(trimmed.to_owned())
    }
}

/// The image file name (ivadomed's `filename` column).
pub fn file_name(entry: &BidsEntry) -> String {
    entry
        .image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| entry.image.display().to_string())
}

/// Draws a split as ivadomed's `split_dataset` does (see the module documentation). Entries without a value
/// in the split column are left out of every set, as ivadomed drops them.
pub fn split_dataset(entries: &[BidsEntry], params: &SplitParams) -> Result<Split> {
    let SplitParams {
        split_method,
        train_fraction,
        test_fraction,
        random_seed,
        data_testing,
        ..
    } = params;
    let (train_fraction, test_fraction) = (*train_fraction, *test_fraction);
    ensure!(
        train_fraction > 0.0 && train_fraction < 1.0,
        "train_fraction must be in (0, 1), got {train_fraction}"
    );
    ensure!(
        (0.0..1.0).contains(&test_fraction),
        "test_fraction must be in [0, 1), got {test_fraction}"
    );
    ensure!(
        train_fraction + test_fraction < 1.0,
        "train_fraction {train_fraction} + test_fraction {test_fraction} = {} leaves nothing for validation \
         (validation gets 1 - train_fraction - test_fraction)",
        train_fraction + test_fraction
    );
    let seed = u32::try_from(*random_seed).map_err(|_| {
        anyhow::anyhow!("random_seed must be in 0..=4294967295 (numpy's range), got {random_seed}")
    })?;

    let kept: Vec<&BidsEntry> = entries
        .iter()
        .filter(|e| group_value(e, split_method).is_some())
        .collect();
    if kept.is_empty() {
        bail!("no entry has a value in the split column `{split_method}`");
    }
    if kept.len() < entries.len() {
        tracing::warn!(
            "{} of {} entries have no `{split_method}` value and are left out of the split",
            entries.len() - kept.len(),
            entries.len()
        );
    }

    // The test column falls back to the split column when no entry has it (ivadomed warns and does the same).
    let mut test_column = data_testing
        .data_type
        .clone()
        .unwrap_or_else(|| split_method.clone());
    if !kept.iter().any(|e| group_value(e, &test_column).is_some()) {
        tracing::warn!(
            "data_testing: no entry has a `{test_column}` value; splitting on `{split_method}` instead"
        );
        test_column = split_method.clone();
    }
    let test_values: BTreeSet<String> = if !data_testing.data_value.is_empty() {
        let present: BTreeSet<String> = kept
            .iter()
            .filter_map(|e| group_value(e, &test_column))
            .collect();
        let unknown: Vec<&String> = data_testing
            .data_value
            .iter()
            .filter(|v| !present.contains(*v))
            .collect();
        ensure!(
            unknown.is_empty(),
            "data_testing: no entry has `{test_column}` = {unknown:?} (values present: {present:?})"
        );
        data_testing.data_value.iter().cloned().collect()
    } else if test_fraction > 0.0 {
        let values: Vec<String> = kept
            .iter()
            .filter_map(|e| group_value(e, &test_column))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // ivadomed: at least one value goes to the test set.
        let fraction = test_fraction.max(1.0 / values.len() as f64);
        let (chosen, _) = train_test_split(&values, fraction, seed).with_context(|| {
            format!(
                "test_fraction {test_fraction} of {} `{test_column}` value(s)",
                values.len()
            )
        })?;
        chosen.into_iter().collect()
    } else {
        BTreeSet::new()
    };
    let in_test =
        |e: &BidsEntry| group_value(e, &test_column).is_some_and(|v| test_values.contains(&v));

    // Groups outside the test set, in order of first appearance (ivadomed's `unique()` order).
    let mut remaining: Vec<String> = Vec::new();
    for entry in kept.iter().filter(|e| !in_test(e)) {
        let value = group_value(entry, split_method).unwrap_or_default();
        if !remaining.contains(&value) {
            remaining.push(value);
        }
    }
    let all_groups = kept
        .iter()
        .filter_map(|e| group_value(e, split_method))
        .collect::<BTreeSet<_>>()
        .len();
    ensure!(
        !remaining.is_empty(),
        "every `{split_method}` value went to the test set: none is left for training and validation"
    );
    // Training gets train_fraction of all groups, taken from the groups the test set left.
    let train_of_remaining = train_fraction * all_groups as f64 / remaining.len() as f64;
    let n = remaining.len() as f64;
    if (train_of_remaining > 1.0 - 1.0 / n && remaining.len() < 2) || train_of_remaining >= 1.0 {
        bail!(
            "{}/{all_groups} `{split_method}` value(s) remain for training and validation: train_fraction \
             {train_fraction} is too large, the validation set would be empty",
            remaining.len()
        );
    }
    let (train_groups, valid_groups) = train_test_split(&remaining, train_of_remaining, seed)
        .with_context(|| {
            format!(
                "train_fraction {train_fraction} of {} remaining `{split_method}` value(s)",
                remaining.len()
            )
        })?;
    let train_groups: BTreeSet<String> = train_groups.into_iter().collect();
    let valid_groups: BTreeSet<String> = valid_groups.into_iter().collect();

    let mut split = Split::default();
    for entry in kept {
        let group = group_value(entry, split_method).unwrap_or_default();
        if in_test(entry) {
            split.test.push(entry.clone());
        } else if train_groups.contains(&group) {
            split.train.push(entry.clone());
        } else if valid_groups.contains(&group) {
            split.valid.push(entry.clone());
        }
    }
    Ok(split)
}

/// The split `params` asks for: read from `fname_split` when given, drawn otherwise. When `output_dir` is
/// given the split is written there as [`SPLIT_FILE_NAME`] (as ivadomed writes `split_datasets.joblib` into
/// its output folder).
pub fn split_entries(
    entries: &[BidsEntry],
    params: &SplitParams,
    output_dir: Option<&Path>,
) -> Result<Split> {
    let split = match &params.fname_split {
        Some(path) => SplitFile::read(path)?.apply(entries, &params.split_method)?,
        None => split_dataset(entries, params)?,
    };
    if let Some(dir) = output_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the output folder {}", dir.display()))?;
        SplitFile::from_split(&split, &params.split_method).write(&dir.join(SPLIT_FILE_NAME))?;
    }
    Ok(split)
}

/// Splits entries by subject with a validation fraction (the older call): [`split_dataset`] on
/// `participant_id` with `train_fraction = 1 - valid_fraction - test_fraction`.
pub fn split_by_subject(
    entries: &[BidsEntry],
    valid_fraction: f64,
    test_fraction: f64,
    seed: u64,
) -> Result<Split> {
    ensure!(
        valid_fraction > 0.0 && valid_fraction + test_fraction < 1.0,
        "valid_fraction {valid_fraction} + test_fraction {test_fraction} must be in (0, 1): \
         validation needs a share and training what is left"
    );
    split_dataset(
        entries,
        &SplitParams {
            train_fraction: 1.0 - valid_fraction - test_fraction,
            test_fraction,
            random_seed: seed,
            ..SplitParams::default()
        },
    )
}

/// `split_datasets.json`: the ids of each set. An id is a value of `split_method` (all entries of that group)
/// or an image file name (that entry only).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_method: Option<String>,
    pub train: Vec<String>,
    pub valid: Vec<String>,
    pub test: Vec<String>,
}

impl SplitFile {
    /// The ids of `split`: group ids, or file names for entries of a group divided between sets.
    pub fn from_split(split: &Split, split_method: &str) -> SplitFile {
        let sets = [&split.train, &split.valid, &split.test];
        let mut set_of_group: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for (index, set) in sets.iter().enumerate() {
            for entry in set.iter() {
                if let Some(group) = group_value(entry, split_method) {
                    set_of_group.entry(group).or_default().insert(index);
                }
            }
        }
        let ids = |set: &[BidsEntry]| -> Vec<String> {
            set.iter()
                .map(|entry| match group_value(entry, split_method) {
                    Some(group) if set_of_group[&group].len() == 1 => group,
                    _ => file_name(entry),
                })
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        SplitFile {
            split_method: Some(split_method.to_owned()),
            train: ids(&split.train),
            valid: ids(&split.valid),
            test: ids(&split.test),
        }
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing the split file {}", path.display()))
    }

    pub fn read(path: &Path) -> Result<SplitFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the split file {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected {{\"train\": [...], \"valid\": [...], \"test\": [...]}}",
                path.display()
            )
        })
    }

    /// The entries each id names. Ids are matched against the file's `split_method` (else `split_method`),
    /// then against image file names. Unknown ids and entries named in two sets are errors; entries the file
    /// does not name are left out (with a warning).
    pub fn apply(&self, entries: &[BidsEntry], split_method: &str) -> Result<Split> {
        let column = self.split_method.as_deref().unwrap_or(split_method);
        let mut set_of_entry: Vec<Option<usize>> = vec![None; entries.len()];
        let mut unknown = Vec::new();
        for (set_index, (set_name, ids)) in [
            ("train", &self.train),
            ("valid", &self.valid),
            ("test", &self.test),
        ]
        .into_iter()
        .enumerate()
        {
            for id in ids {
                let by_group: Vec<usize> = (0..entries.len())
                    .filter(|&i| group_value(&entries[i], column).as_deref() == Some(id.as_str()))
                    .collect();
                let matched = if by_group.is_empty() {
                    (0..entries.len())
                        .filter(|&i| file_name(&entries[i]) == *id)
                        .collect()
                } else {
                    by_group
                };
                if matched.is_empty() {
                    unknown.push(format!("{set_name}: {id}"));
                }
                for i in matched {
                    match set_of_entry[i] {
                        Some(other) if other != set_index => bail!(
                            "split file: {} is listed in both {} and {set_name}",
                            file_name(&entries[i]),
                            ["train", "valid", "test"][other]
                        ),
                        _ => set_of_entry[i] = Some(set_index),
                    }
                }
            }
        }
        ensure!(
            unknown.is_empty(),
            "split file names id(s) that are not in the dataset (no `{column}` value or image file name \
             matches): {}",
            unknown.join(", ")
        );
        let unnamed = set_of_entry.iter().filter(|s| s.is_none()).count();
        if unnamed > 0 {
            tracing::warn!("{unnamed} entries are not named by the split file and are left out");
        }
        let mut split = Split::default();
        for (entry, set) in entries.iter().zip(set_of_entry) {
            match set {
                Some(0) => split.train.push(entry.clone()),
                Some(1) => split.valid.push(entry.clone()),
                Some(_) => split.test.push(entry.clone()),
                None => {}
            }
        }
        Ok(split)
    }
}

/// scikit-learn's `train_test_split(items, train_size=train_size, random_state=seed)`: returns
/// (train, test). The train part has `floor(train_size * n)` items, the test part the rest; test takes the
/// first positions of numpy's `RandomState(seed).permutation(n)`, train the following ones.
pub fn train_test_split<T: Clone>(
    items: &[T],
    train_size: f64,
    seed: u32,
) -> Result<(Vec<T>, Vec<T>)> {
    let n = items.len();
    ensure!(
        train_size > 0.0 && train_size < 1.0,
        "the fraction {train_size} must be in (0, 1) (here with {n} item(s))"
    );
    // floor(1/n * n) can come out as 0 in floating point (n = 49); one item is what the fraction means.
    let n_train = ((train_size * n as f64).floor() as usize).max(1);
    ensure!(
        n_train < n,
        "a fraction {train_size} of {n} item(s) leaves the other part empty"
    );
    let n_test = n - n_train;
    let permutation = numpy_permutation(n, seed);
    let pick = |positions: &[usize]| positions.iter().map(|&i| items[i].clone()).collect();
    Ok((pick(&permutation[n_test..]), pick(&permutation[..n_test])))
}

/// numpy's `RandomState(seed).permutation(n)`: a Fisher–Yates shuffle of `0..n` from the last position down,
/// each swap partner drawn by masked rejection sampling on the Mersenne Twister's 32-bit outputs.
pub fn numpy_permutation(n: usize, seed: u32) -> Vec<usize> {
    let mut generator = Mt19937::new(seed);
    let mut values: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = generator.interval(i as u32) as usize;
        values.swap(i, j);
    }
    values
}

/// MT19937 as numpy seeds it from one integer (`init_genrand`).
struct Mt19937 {
    state: [u32; 624],
    position: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let previous = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(previous ^ (previous >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 {
            state,
            position: 624,
        }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.position = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.position >= 624 {
            self.twist();
        }
        let mut y = self.state[self.position];
        self.position += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// A uniform integer in `0..=max` (numpy's `random_interval`).
    fn interval(&mut self, max: u32) -> u32 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for shift in [1, 2, 4, 8, 16] {
            mask |= mask >> shift;
        }
        loop {
            let value = self.next_u32() & mask;
            if value <= max {
                return value;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten subjects with a T1w and a T2w each, in four centres (3 + 3 + 2 + 2 subjects).
    fn dataset() -> Vec<BidsEntry> {
        let centre = |s: usize| match s {
            1..=3 => "montreal",
            4..=6 => "paris",
            7 | 8 => "tokyo",
            _ => "london",
        };
        (1..=10)
            .flat_map(|s| {
                ["T1w", "T2w"].map(|contrast| {
                    let subject = format!("sub-{s:02}");
                    let mut metadata = BTreeMap::new();
                    metadata.insert("institution_id".to_owned(), centre(s).to_owned());
                    // One scanner per contrast, so a subject's images can sit on both sides of a scanner split.
                    let scanner = if contrast == "T1w" { "A" } else { "B" };
                    metadata.insert("scanner".to_owned(), scanner.to_owned());
                    BidsEntry {
                        image: PathBuf::from(format!(
                            "/data/{subject}/anat/{subject}_{contrast}.nii.gz"
                        )),
                        subject,
                        session: None,
                        contrast: contrast.into(),
                        label: None,
                        sidecar: None,
                        metadata,
                        targets: Vec::new(),
                        roi: None,
                        ..Default::default()
                    }
                })
            })
            .collect()
    }

    fn values(set: &[BidsEntry], column: &str) -> Vec<String> {
        set.iter()
            .filter_map(|e| group_value(e, column))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    fn groups(split: &Split, column: &str) -> [Vec<String>; 3] {
        [
            values(&split.train, column),
            values(&split.valid, column),
            values(&split.test, column),
        ]
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn params(split_method: &str, train: f64, test: f64, seed: u64) -> SplitParams {
        SplitParams {
            split_method: split_method.into(),
            train_fraction: train,
            test_fraction: test,
            random_seed: seed,
            ..SplitParams::default()
        }
    }

    #[test]
    fn permutation_matches_numpy_random_state() {
        // Expected values printed by numpy 2.4.6: np.random.RandomState(seed).permutation(n).tolist()
        assert_eq!(numpy_permutation(10, 6), [8, 1, 7, 0, 6, 5, 2, 4, 3, 9]);
        assert_eq!(numpy_permutation(5, 0), [2, 0, 1, 3, 4]);
        assert_eq!(numpy_permutation(3, 42), [0, 1, 2]);
        assert_eq!(
            numpy_permutation(20, 1),
            [3, 16, 6, 10, 2, 14, 4, 17, 7, 1, 13, 0, 19, 18, 9, 15, 8, 12, 11, 5]
        );
    }

    #[test]
    fn train_test_split_matches_scikit_learn() {
        // scikit-learn 1.x: train_test_split(list(range(10)), train_size=0.3, random_state=6)
        // -> [[4, 3, 9], [8, 1, 7, 0, 6, 5, 2]]
        let items: Vec<usize> = (0..10).collect();
        let (train, test) = train_test_split(&items, 0.3, 6).unwrap();
        assert_eq!(train, [4, 3, 9]);
        assert_eq!(test, [8, 1, 7, 0, 6, 5, 2]);
    }

    // Expected sets below were printed by a Python transcription of ivadomed's split_dataset steps that calls
    // scikit-learn 1.x's own train_test_split on the same 20-row table (participant_id, institution_id,
    // filename), so sizes, order of unique values and the numpy permutation are all the real libraries'.

    #[test]
    fn participant_split_matches_ivadomed() {
        let split = split_dataset(&dataset(), &params("participant_id", 0.6, 0.2, 6)).unwrap();
        assert_eq!(
            groups(&split, "participant_id"),
            [
                strings(&["sub-02", "sub-03", "sub-05", "sub-06", "sub-08", "sub-09"]),
                strings(&["sub-01", "sub-07"]),
                strings(&["sub-04", "sub-10"]),
            ]
        );
        assert_eq!(
            (split.train.len(), split.valid.len(), split.test.len()),
            (12, 4, 4),
            "both images of each subject follow it"
        );
        let seed7 = split_dataset(&dataset(), &params("participant_id", 0.6, 0.2, 7)).unwrap();
        assert_eq!(
            groups(&seed7, "participant_id"),
            [
                strings(&["sub-01", "sub-02", "sub-04", "sub-06", "sub-09", "sub-10"]),
                strings(&["sub-03", "sub-08"]),
                strings(&["sub-05", "sub-07"]),
            ]
        );
    }

    #[test]
    fn metadata_column_split_keeps_each_centre_in_one_set() {
        let split = split_dataset(&dataset(), &params("institution_id", 0.5, 0.25, 6)).unwrap();
        let [train, valid, test] = groups(&split, "institution_id");
        assert_eq!(
            [train.clone(), valid.clone(), test.clone()],
            [
                strings(&["london", "tokyo"]),
                strings(&["montreal"]),
                strings(&["paris"])
            ]
        );
        for (a, b) in [(&train, &valid), (&train, &test), (&valid, &test)] {
            assert!(
                a.iter().all(|v| !b.contains(v)),
                "{a:?} and {b:?} share a centre"
            );
        }
        // Every image of a centre is where its centre is: 4 + 4 training images from london and tokyo.
        assert_eq!(split.train.len(), 8);
        assert_eq!(split.valid.len(), 6);
        assert_eq!(split.test.len(), 6);
    }

    #[test]
    fn data_testing_forces_values_into_the_test_set() {
        let mut forced = params("participant_id", 0.6, 0.2, 6);
        forced.data_testing = DataTesting {
            data_type: Some("institution_id".into()),
            data_value: strings(&["paris"]),
        };
        let split = split_dataset(&dataset(), &forced).unwrap();
        assert_eq!(
            groups(&split, "participant_id"),
            [
                strings(&["sub-01", "sub-02", "sub-03", "sub-07", "sub-09", "sub-10"]),
                strings(&["sub-08"]),
                strings(&["sub-04", "sub-05", "sub-06"]),
            ]
        );
        assert_eq!(values(&split.test, "institution_id"), strings(&["paris"]));
        assert!(!values(&split.train, "institution_id").contains(&"paris".to_owned()));

        // No data_value: test_fraction of the centres drawn at random (seed 2 draws london).
        let mut drawn = params("participant_id", 0.6, 0.2, 2);
        drawn.data_testing.data_type = Some("institution_id".into());
        let split = split_dataset(&dataset(), &drawn).unwrap();
        assert_eq!(
            groups(&split, "participant_id"),
            [
                strings(&["sub-01", "sub-03", "sub-04", "sub-06", "sub-07", "sub-08"]),
                strings(&["sub-02", "sub-05"]),
                strings(&["sub-09", "sub-10"]),
            ]
        );

        forced.data_testing.data_value = strings(&["paris", "berlin"]);
        let error = split_dataset(&dataset(), &forced).unwrap_err().to_string();
        assert!(error.contains("[\"berlin\"]"), "{error}");
    }

    #[test]
    fn split_file_round_trip_gives_the_same_split() {
        let dir = std::env::temp_dir().join(format!("ivado-split-{}", std::process::id()));
        let entries = dataset();
        let check_round_trip = |params: &SplitParams, name: &str| {
            let out = dir.join(name);
            let drawn = split_entries(&entries, params, Some(&out)).unwrap();
            let file = out.join(SPLIT_FILE_NAME);
            let read = split_entries(
                &entries,
                &SplitParams {
                    fname_split: Some(file.clone()),
                    ..params.clone()
                },
                None,
            )
            .unwrap();
            let images = |set: &[BidsEntry]| set.iter().map(file_name).collect::<Vec<_>>();
            assert_eq!(images(&read.train), images(&drawn.train), "{name}");
            assert_eq!(images(&read.valid), images(&drawn.valid), "{name}");
            assert_eq!(images(&read.test), images(&drawn.test), "{name}");
            SplitFile::read(&file).unwrap()
        };
        let by_centre = check_round_trip(&params("institution_id", 0.5, 0.25, 6), "centre");
        assert_eq!(by_centre.test, strings(&["paris"]), "group ids are written");

        // Test images chosen by scanner: each subject has one image on each side, so file names are written.
        let mut by_scanner = params("participant_id", 0.6, 0.2, 6);
        by_scanner.data_testing = DataTesting {
            data_type: Some("scanner".into()),
            data_value: strings(&["B"]),
        };
        let file = check_round_trip(&by_scanner, "scanner");
        assert_eq!(file.test.len(), 10);
        assert!(
            file.test.iter().all(|id| id.ends_with("_T2w.nii.gz")),
            "{file:?}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn split_file_refuses_unknown_ids_by_name() {
        let file = SplitFile {
            split_method: Some("participant_id".into()),
            train: strings(&["sub-01", "sub-99"]),
            valid: strings(&["sub-02"]),
            test: strings(&["sub-03_T1w.nii.gz", "sub-77_T2w.nii.gz"]),
        };
        let error = file
            .apply(&dataset(), "participant_id")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("train: sub-99") && error.contains("test: sub-77_T2w.nii.gz"),
            "{error}"
        );
        assert!(!error.contains("sub-01,"), "{error}");

        let twice = SplitFile {
            split_method: None,
            train: strings(&["sub-01"]),
            valid: strings(&["sub-01_T2w.nii.gz"]),
            test: vec![],
        };
        let error = twice
            .apply(&dataset(), "participant_id")
            .unwrap_err()
            .to_string();
        assert!(error.contains("both train and valid"), "{error}");
    }

    #[test]
    fn bad_fractions_are_named() {
        let entries = dataset();
        let error = |p: SplitParams| split_dataset(&entries, &p).unwrap_err().to_string();
        let message = error(params("participant_id", 0.8, 0.3, 0));
        assert!(
            message.contains("train_fraction 0.8 + test_fraction 0.3"),
            "{message}"
        );
        let message = error(params("participant_id", 0.0, 0.2, 0));
        assert!(message.contains("train_fraction must be"), "{message}");
        let message = error(params("participant_id", 0.5, -0.1, 0));
        assert!(message.contains("test_fraction must be"), "{message}");
        // 4 centres: one goes to test, 3 remain; training would need 0.8 * 4 = 3.2 of those 3.
        let message = error(params("institution_id", 0.8, 0.1, 0));
        assert!(
            message.contains("3/4 `institution_id`") && message.contains("train_fraction 0.8"),
            "{message}"
        );
        let message = error(params("no_such_column", 0.6, 0.2, 0));
        assert!(message.contains("`no_such_column`"), "{message}");
    }

    #[test]
    fn same_seed_same_split_and_seeds_differ() {
        let entries = dataset();
        let test_of = |seed| {
            let split = split_dataset(&entries, &params("participant_id", 0.6, 0.2, seed)).unwrap();
            groups(&split, "participant_id")
        };
        assert_eq!(test_of(11), test_of(11));
        let distinct: BTreeSet<_> = (0..10).map(test_of).collect();
        assert!(
            distinct.len() > 5,
            "only {} distinct splits",
            distinct.len()
        );
    }

    #[test]
    fn split_by_subject_keeps_its_signature() {
        // valid 0.2 + test 0.2 of 10 subjects is train 0.6: the participant split above.
        let split = split_by_subject(&dataset(), 0.2, 0.2, 6).unwrap();
        assert_eq!(
            groups(&split, "participant_id")[2],
            strings(&["sub-04", "sub-10"])
        );
        let two = &dataset()[..4];
        let error = split_by_subject(two, 0.5, 0.5, 0).unwrap_err().to_string();
        assert!(
            error.contains("valid_fraction 0.5 + test_fraction 0.5"),
            "{error}"
        );
    }
}
