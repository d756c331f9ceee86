//! A small BIDS index of anatomical images and their derivative labels.
//!
//! Layout handled: `root/sub-*/[ses-*/]anat/*.nii[.gz]`, labels under
//! `root/derivatives/labels/<sub>[/<ses>]/anat/<image stem><target suffix>.nii[.gz]`, JSON sidecars next to
//! the images. Labels are matched only by that exact path, so a label file sitting in another subject's
//! folder is never used (it is reported with a warning).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The index: every anatomical image found, sorted by image path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BidsIndex {
    pub root: PathBuf,
    pub entries: Vec<BidsEntry>,
}

/// One anatomical image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BidsEntry {
    /// subject folder name, e.g. "sub-unf01"
    pub subject: String,
    /// session folder name, e.g. "ses-01"
    pub session: Option<String>,
    /// filename suffix, e.g. "T2w"
    pub contrast: String,
    pub image: PathBuf,
    /// derivatives/labels/<sub>[/<ses>]/anat/<image stem><target suffix>.nii[.gz]
    pub label: Option<PathBuf>,
    /// <image stem>.json next to the image
    pub sidecar: Option<PathBuf>,
    /// participants/samples/sessions/scans tsv columns and sidecar fields merged, as text
    pub metadata: std::collections::BTreeMap<String, String>,
    /// one label path per requested target suffix (None where that suffix has no file)
    pub targets: Vec<Option<PathBuf>>,
    /// ROI mask (roi_params.suffix) when requested and found
    pub roi: Option<PathBuf>,
}

/// What to index.
#[derive(Debug, Clone, Copy)]
pub struct BidsQuery<'a> {
    /// label suffix appended to the image stem, e.g. "_seg-manual" (a missing leading `_` is added);
    /// empty: no labels are looked up
    pub target_suffix: &'a str,
    /// keep only these contrasts (filename suffixes); `None`: all
    pub contrasts: Option<&'a [String]>,
}

impl BidsIndex {
    /// Scans `root`. Errors when the root is missing, is not a directory, or holds no `sub-*` folder.
    pub fn scan(root: &Path, query: &BidsQuery) -> Result<BidsIndex> {
        let meta = fs::metadata(root).with_context(|| {
            format!(
                "BIDS root {} does not exist or cannot be read",
                root.display()
            )
        })?;
        if !meta.is_dir() {
            bail!("BIDS root {} is not a directory", root.display());
        }
        let subjects = list_dirs(root, "sub-")?;
        if subjects.is_empty() {
            bail!(
                "BIDS root {} has no subject folders (sub-*)",
                root.display()
            );
        }
        let suffix = normalize_suffix(query.target_suffix);
        let labels_root = root.join("derivatives").join("labels");

        let mut entries = Vec::new();
        for subject in &subjects {
            let subject_dir = root.join(subject);
            let mut units = vec![(None, subject_dir.join("anat"))];
            for session in list_dirs(&subject_dir, "ses-")? {
                let anat = subject_dir.join(&session).join("anat");
                units.push((Some(session), anat));
            }
            for (session, anat) in units {
                if !anat.is_dir() {
                    continue;
                }
                for image in list_nifti_files(&anat)? {
                    let name = file_name(&image);
                    let stem = nifti_stem(&name).unwrap_or(&name).to_string();
                    let Some(contrast) = check_entities(&stem, subject, session.as_deref(), &image)
                    else {
                        continue;
                    };
                    if let Some(wanted) = query.contrasts {
                        if !wanted.contains(&contrast) {
                            continue;
                        }
                    }
                    let label = if suffix.is_empty() {
                        None
                    } else {
                        let mut dir = labels_root.join(subject);
                        if let Some(s) = &session {
                            dir = dir.join(s);
                        }
                        let dir = dir.join("anat");
                        [".nii.gz", ".nii"]
                            .iter()
                            .map(|ext| dir.join(format!("{stem}{suffix}{ext}")))
                            .find(|p| p.is_file())
                    };
                    let sidecar = Some(anat.join(format!("{stem}.json"))).filter(|p| p.is_file());
                    entries.push(BidsEntry {
                        subject: subject.clone(),
                        session: session.clone(),
                        contrast,
                        image,
                        label,
                        sidecar,
                        metadata: Default::default(),
                        targets: Vec::new(),
                        roi: None,
                    });
                }
            }
        }
        if labels_root.is_dir() {
            warn_misplaced_labels(&labels_root)?;
        }
        entries.sort_by(|a, b| a.image.cmp(&b.image));
        Ok(BidsIndex {
            root: root.to_path_buf(),
            entries,
        })
    }

    /// Sorted unique subjects of the entries.
    pub fn subjects(&self) -> Vec<String> {
        let mut s: Vec<String> = self.entries.iter().map(|e| e.subject.clone()).collect();
        s.sort();
        s.dedup();
        s
    }

    /// Sorted unique contrasts of the entries.
    pub fn contrasts(&self) -> Vec<String> {
        let mut c: Vec<String> = self.entries.iter().map(|e| e.contrast.clone()).collect();
        c.sort();
        c.dedup();
        c
    }

    /// Entries that have a label.
    pub fn with_labels(&self) -> Vec<&BidsEntry> {
        self.entries.iter().filter(|e| e.label.is_some()).collect()
    }
}

fn normalize_suffix(suffix: &str) -> String {
    if suffix.is_empty() || suffix.starts_with('_') {
        suffix.to_string()
    } else {
        format!("_{suffix}")
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// "sub-01_T1w.nii.gz" -> "sub-01_T1w"; None when not a NIfTI name.
fn nifti_stem(name: &str) -> Option<&str> {
    name.strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
        .filter(|s| !s.is_empty())
}

/// Checks the file's `sub-`/`ses-` entities against its folders and returns its suffix (contrast); warns and
/// returns None on a mismatch or a name without a suffix.
fn check_entities(
    stem: &str,
    subject: &str,
    session: Option<&str>,
    image: &Path,
) -> Option<String> {
    let parts: Vec<&str> = stem.split('_').collect();
    if parts[0] != subject {
        tracing::warn!(
            file = %image.display(),
            "skipping image: its subject entity {:?} disagrees with its folder {subject}",
            parts[0]
        );
        return None;
    }
    let file_session = parts
        .iter()
        .skip(1)
        .find(|p| p.starts_with("ses-"))
        .copied();
    if file_session != session {
        tracing::warn!(
            file = %image.display(),
            "skipping image: its session entity {file_session:?} disagrees with its folder {session:?}"
        );
        return None;
    }
    match parts.last() {
        Some(suffix) if parts.len() >= 2 && !suffix.is_empty() && !suffix.contains('-') => {
            Some(suffix.to_string())
        }
        _ => {
            tracing::warn!(file = %image.display(), "skipping image: no BIDS suffix (contrast) in its name");
            None
        }
    }
}

/// Sorted names of the non-hidden subdirectories of `dir` starting with `prefix`.
fn list_dirs(dir: &Path, prefix: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && entry.path().is_dir() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Sorted non-hidden `.nii` / `.nii.gz` files of `dir`.
fn list_nifti_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !name.starts_with('.') && nifti_stem(&name).is_some() && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Warns about label files whose `sub-`/`ses-` entities do not match the folder they sit in; such files are
/// never matched to any image.
fn warn_misplaced_labels(labels_root: &Path) -> Result<()> {
    for subject in list_dirs(labels_root, "sub-")? {
        let subject_dir = labels_root.join(&subject);
        let mut units = vec![(None, subject_dir.join("anat"))];
        for session in list_dirs(&subject_dir, "ses-")? {
            let anat = subject_dir.join(&session).join("anat");
            units.push((Some(session), anat));
        }
        for (session, anat) in units {
            if !anat.is_dir() {
                continue;
            }
            for label in list_nifti_files(&anat)? {
                let name = file_name(&label);
                let stem = nifti_stem(&name).unwrap_or(&name);
                let parts: Vec<&str> = stem.split('_').collect();
                let file_session = parts
                    .iter()
                    .skip(1)
                    .find(|p| p.starts_with("ses-"))
                    .copied();
                if parts[0] != subject || file_session != session.as_deref() {
                    tracing::warn!(
                        file = %label.display(),
                        "misplaced label file: its name says {} {:?} but it is in folder {subject} {:?}; it is not matched to any image",
                        parts[0],
                        file_session,
                        session
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FUNC: &str = "/work/shared/data/data_functional_testing";
    const TESTING: &str = "/work/shared/data/data-testing";

    fn query<'a>(contrasts: Option<&'a [String]>) -> BidsQuery<'a> {
        BidsQuery {
            target_suffix: "_seg-manual",
            contrasts,
        }
    }

    #[test]
    fn functional_testing_index() {
        let index = BidsIndex::scan(Path::new(FUNC), &query(None)).unwrap();
        assert_eq!(index.entries.len(), 9);
        assert_eq!(
            index.subjects(),
            vec!["sub-unf01", "sub-unf02", "sub-unf03"]
        );
        assert_eq!(index.contrasts(), vec!["T1w", "T2star", "T2w"]);
        assert_eq!(index.with_labels().len(), 8);
        for e in &index.entries {
            assert_eq!(e.session, None);
            let stem = format!("{}_{}", e.subject, e.contrast);
            assert_eq!(
                e.image,
                Path::new(FUNC)
                    .join(&e.subject)
                    .join("anat")
                    .join(format!("{stem}.nii.gz"))
            );
            assert_eq!(
                e.sidecar.as_deref(),
                Some(
                    Path::new(FUNC)
                        .join(&e.subject)
                        .join("anat")
                        .join(format!("{stem}.json"))
                        .as_path()
                )
            );
            if e.subject == "sub-unf02" && e.contrast == "T1w" {
                // upstream quirk: derivatives/labels/sub-unf02/anat/sub-unf01_T1w_seg-manual.nii.gz is not its label
                assert_eq!(e.label, None);
            } else {
                let expected = Path::new(FUNC)
                    .join("derivatives/labels")
                    .join(&e.subject)
                    .join("anat")
                    .join(format!("{stem}_seg-manual.nii.gz"));
                assert_eq!(e.label.as_deref(), Some(expected.as_path()), "{e:?}");
            }
        }
        // deterministic, sorted
        let again = BidsIndex::scan(Path::new(FUNC), &query(None)).unwrap();
        assert_eq!(again, index);
        let mut sorted = index.entries.clone();
        sorted.sort_by(|a, b| a.image.cmp(&b.image));
        assert_eq!(sorted, index.entries);
    }

    #[test]
    fn contrast_filter() {
        let wanted = vec!["T2w".to_string(), "T1w".to_string()];
        let index = BidsIndex::scan(Path::new(FUNC), &query(Some(&wanted))).unwrap();
        assert_eq!(index.entries.len(), 6);
        assert_eq!(index.contrasts(), vec!["T1w", "T2w"]);
        assert_eq!(index.with_labels().len(), 5);
        let none: Vec<String> = vec!["FLAIR".into()];
        let index = BidsIndex::scan(Path::new(FUNC), &query(Some(&none))).unwrap();
        assert!(index.entries.is_empty());
        // other target suffixes, and the suffix without its leading underscore
        let lesion = BidsIndex::scan(
            Path::new(FUNC),
            &BidsQuery {
                target_suffix: "lesion-manual",
                contrasts: None,
            },
        )
        .unwrap();
        assert_eq!(lesion.with_labels().len(), 9);
        let no_target = BidsIndex::scan(
            Path::new(FUNC),
            &BidsQuery {
                target_suffix: "",
                contrasts: None,
            },
        )
        .unwrap();
        assert!(no_target.with_labels().is_empty());
    }

    /// df_ref.csv is ivadomed's expected BIDS table for data-testing (first column: filename). Its image rows
    /// with a `<stem>_seg-manual.nii.gz` row must be exactly the images our index labels, for the contrasts
    /// of those image rows (T1w and T2w: the table was made with those contrasts only, so sub-unf01_T2star,
    /// which also has a seg-manual label on disk, is not in it).
    #[test]
    fn matches_ivadomed_df_ref() {
        let csv = fs::read_to_string(Path::new(TESTING).join("df_ref.csv")).unwrap();
        let mut lines = csv.lines();
        assert!(lines.next().unwrap().starts_with("filename,"));
        let filenames: Vec<&str> = lines
            .filter_map(|l| l.split(',').next())
            .filter(|f| !f.is_empty())
            .collect();
        let images: Vec<&str> = filenames
            .iter()
            .copied()
            .filter(|f| f.ends_with(".nii.gz") && !f.contains("-manual"))
            .collect();
        let mut expected: Vec<String> = images
            .iter()
            .filter(|img| {
                let label = format!("{}_seg-manual.nii.gz", nifti_stem(img).unwrap());
                filenames.contains(&label.as_str())
            })
            .map(|s| s.to_string())
            .collect();
        expected.sort();
        assert_eq!(
            expected,
            vec!["sub-unf01_T1w.nii.gz", "sub-unf01_T2w.nii.gz"]
        );
        let mut contrasts: Vec<String> = images
            .iter()
            .map(|img| {
                nifti_stem(img)
                    .unwrap()
                    .rsplit('_')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        contrasts.sort();
        contrasts.dedup();

        let index = BidsIndex::scan(Path::new(TESTING), &query(Some(&contrasts))).unwrap();
        let mut found: Vec<String> = index
            .with_labels()
            .iter()
            .map(|e| file_name(&e.image))
            .collect();
        found.sort();
        assert_eq!(found, expected);
        // all three subjects have T1w/T2w images; only sub-unf01 has seg-manual labels
        assert_eq!(
            index.subjects(),
            vec!["sub-unf01", "sub-unf02", "sub-unf03"]
        );
        assert_eq!(index.entries.len(), 6);
    }

    /// A `Write` into a shared buffer, to capture tracing output.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn warns_about_the_misplaced_label() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        let index = tracing::subscriber::with_default(subscriber, || {
            BidsIndex::scan(Path::new(FUNC), &query(None)).unwrap()
        });
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let misplaced = Path::new(FUNC)
            .join("derivatives/labels/sub-unf02/anat/sub-unf01_T1w_seg-manual.nii.gz");
        assert!(
            log.contains("misplaced label") && log.contains(&misplaced.display().to_string()),
            "{log}"
        );
        assert_eq!(log.matches("WARN").count(), 1, "{log}");
        assert!(index
            .entries
            .iter()
            .all(|e| e.label.as_deref() != Some(misplaced.as_path())));
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("ivado-bids-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sessions_mismatches_and_errors() {
        let root = temp_dir("layout");
        let touch = |rel: &str| {
            let p = root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        };
        touch("sub-a/ses-01/anat/sub-a_ses-01_T1w.nii.gz");
        touch("sub-a/ses-01/anat/sub-a_ses-01_T1w.json");
        touch("sub-a/ses-02/anat/sub-a_ses-02_acq-hi_T2w.nii");
        touch("sub-a/ses-02/anat/sub-b_ses-02_T2w.nii.gz"); // wrong subject entity: skipped
        touch("sub-a/ses-02/anat/sub-a_ses-01_T1w.nii.gz"); // wrong session entity: skipped
        touch("sub-a/ses-02/anat/.sub-a_ses-02_T1w.nii.gz"); // hidden: skipped
        touch("sub-b/anat/sub-b_T1w.nii.gz");
        touch("sub-b/anat/notes.txt");
        touch(".sub-hidden/anat/sub-hidden_T1w.nii.gz");
        touch("derivatives/labels/sub-a/ses-01/anat/sub-a_ses-01_T1w_seg-manual.nii.gz");
        touch("derivatives/labels/sub-a/ses-02/anat/sub-a_ses-02_acq-hi_T2w_seg-manual.nii");
        touch("derivatives/labels/sub-b/anat/sub-a_ses-01_T1w_seg-manual.nii.gz"); // misplaced
        touch("derivatives/sub-c/anat/sub-c_T1w.nii.gz");

        let index = BidsIndex::scan(&root, &query(None)).unwrap();
        let names: Vec<String> = index.entries.iter().map(|e| file_name(&e.image)).collect();
        assert_eq!(
            names,
            vec![
                "sub-a_ses-01_T1w.nii.gz",
                "sub-a_ses-02_acq-hi_T2w.nii",
                "sub-b_T1w.nii.gz"
            ]
        );
        let e = &index.entries;
        assert_eq!(e[0].session.as_deref(), Some("ses-01"));
        assert_eq!(e[0].contrast, "T1w");
        assert!(e[0].label.is_some() && e[0].sidecar.is_some());
        assert_eq!(e[1].contrast, "T2w");
        assert_eq!(
            e[1].label.as_deref(),
            Some(
                root.join(
                    "derivatives/labels/sub-a/ses-02/anat/sub-a_ses-02_acq-hi_T2w_seg-manual.nii"
                )
                .as_path()
            )
        );
        assert_eq!(e[1].sidecar, None);
        assert_eq!(e[2].session, None);
        assert_eq!(e[2].label, None);
        assert_eq!(index.subjects(), vec!["sub-a", "sub-b"]);

        // errors name the path
        let missing = root.join("nope");
        let msg = format!("{:#}", BidsIndex::scan(&missing, &query(None)).unwrap_err());
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        let file = root.join("sub-b/anat/notes.txt");
        let msg = format!("{:#}", BidsIndex::scan(&file, &query(None)).unwrap_err());
        assert!(
            msg.contains(&file.display().to_string()) && msg.contains("not a directory"),
            "{msg}"
        );
        let empty = root.join("empty");
        fs::create_dir_all(empty.join("anat")).unwrap();
        let msg = format!("{:#}", BidsIndex::scan(&empty, &query(None)).unwrap_err());
        assert!(
            msg.contains(&empty.display().to_string()) && msg.contains("no subject"),
            "{msg}"
        );
        let _ = fs::remove_dir_all(&root);
    }
}
