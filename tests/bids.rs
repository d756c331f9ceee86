//! BIDS indexing against ivadomed's own index tables (`df_ref*.csv` in data-testing, written by ivadomed's
//! `BidsDataframe` with the loader parameters of its tests/test_bids_dataframe.py), plus the options of the
//! script `bids(...)` primitive.
use ivado_runtime::bids::{
    BidsIndex, BidsOptions, MissingLabel, SubjectSelection, INDEX_FILE_NAME,
};
use ivado_tests::{run_ivado, shared_data};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Columns that are filename entities rather than metadata.
const ENTITY_COLUMNS: &[&str] = &[
    "filename",
    "datatype",
    "extension",
    "subject",
    "suffix",
    "session",
    "sample",
    "run",
    "acquisition",
];

/// A CSV table as Python's csv module writes it (quoted fields may hold commas and doubled quotes).
struct Table {
    header: Vec<String>,
    rows: Vec<BTreeMap<String, String>>,
}

fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    field.push('"');
                    chars.next();
                }
                '"' => in_quotes = false,
                c => field.push(c),
            }
        } else {
            match c {
                '"' => in_quotes = true,
                ',' => row.push(std::mem::take(&mut field)),
                '\n' => {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                '\r' => {}
                c => field.push(c),
            }
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows.retain(|r| !(r.len() == 1 && r[0].is_empty()));
    rows
}

fn read_table(path: &Path) -> Table {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = parse_csv(&text).into_iter();
    let header = lines.next().expect("a header line");
    let rows = lines
        .map(|cells| {
            assert_eq!(cells.len(), header.len(), "{}: {cells:?}", path.display());
            header.iter().cloned().zip(cells).collect()
        })
        .collect();
    Table { header, rows }
}

/// Builds the index with ivadomed's loader parameters, writes our `bids_dataframe.csv`, and checks it against
/// ivadomed's reference table: the same columns (ours has `path` too, which ivadomed's test drops), the same
/// rows compared as a multiset, and entries whose fields agree with the table.
fn check_against_reference(roots: &[PathBuf], options: BidsOptions, reference: &Path) -> BidsIndex {
    let out = tempfile::tempdir().unwrap();
    let options = BidsOptions {
        write_index: Some(out.path().to_path_buf()),
        ..options
    };
    let index = BidsIndex::build(roots, &options).unwrap();
    let ours = read_table(&out.path().join(INDEX_FILE_NAME));
    let expected = read_table(reference);

    assert_eq!(&ours.header[..2], ["path", "filename"]);
    let our_columns: BTreeSet<&String> = ours.header[1..].iter().collect();
    let expected_columns: BTreeSet<&String> = expected.header.iter().collect();
    assert_eq!(
        our_columns,
        expected_columns,
        "columns differ from {}",
        reference.display()
    );
    let rows = |table: &Table| {
        let mut rows: Vec<Vec<(String, String)>> = table
            .rows
            .iter()
            .map(|row| {
                expected
                    .header
                    .iter()
                    .map(|c| (c.clone(), row[c].clone()))
                    .collect()
            })
            .collect();
        rows.sort();
        rows
    };
    let (our_rows, expected_rows) = (rows(&ours), rows(&expected));
    for (ours, theirs) in our_rows.iter().zip(&expected_rows) {
        assert_eq!(
            ours,
            theirs,
            "first differing row vs {}",
            reference.display()
        );
    }
    assert_eq!(our_rows.len(), expected_rows.len());

    // the entries themselves (not only the CSV) carry the table's values
    let image_rows: Vec<&BTreeMap<String, String>> = expected
        .rows
        .iter()
        .filter(|r| !r["suffix"].is_empty())
        .collect();
    assert_eq!(index.entries.len(), image_rows.len());
    let mut expected_derivatives: BTreeSet<&str> = expected
        .rows
        .iter()
        .filter(|r| r["suffix"].is_empty())
        .map(|r| r["filename"].as_str())
        .collect();
    for row in image_rows {
        let entry = index
            .entries
            .iter()
            .find(|e| e.filename() == row["filename"])
            .unwrap_or_else(|| panic!("no entry for {}", row["filename"]));
        assert_eq!(entry.contrast, row["suffix"]);
        assert_eq!(entry.datatype, row["datatype"]);
        assert_eq!(entry.extension, row["extension"]);
        assert_eq!(entry.subject, format!("sub-{}", row["subject"]));
        if let Some(session) = row.get("session").filter(|s| !s.is_empty()) {
            assert_eq!(
                entry.session.as_deref(),
                Some(format!("ses-{session}").as_str())
            );
        }
        if let Some(sample) = row.get("sample").filter(|s| !s.is_empty()) {
            assert_eq!(
                entry.sample.as_deref(),
                Some(format!("sample-{sample}").as_str())
            );
        }
        if let Some(run) = row.get("run").filter(|s| !s.is_empty()) {
            assert_eq!(entry.run.as_deref(), Some(format!("run-{run}").as_str()));
        }
        let expected_metadata: BTreeMap<&str, &str> = row
            .iter()
            .filter(|(c, v)| !ENTITY_COLUMNS.contains(&c.as_str()) && !v.is_empty())
            .map(|(c, v)| (c.as_str(), v.as_str()))
            .collect();
        let metadata: BTreeMap<&str, &str> = entry
            .metadata
            .iter()
            .map(|(c, v)| (c.as_str(), v.as_str()))
            .collect();
        assert_eq!(metadata, expected_metadata, "{}", row["filename"]);
        for label in entry.targets.iter().flatten().chain(&entry.roi) {
            let name = label.file_name().unwrap().to_str().unwrap();
            assert!(
                expected_derivatives.remove(name),
                "{name} is not a derivative of the reference table"
            );
        }
    }
    assert!(
        expected_derivatives.is_empty(),
        "derivatives not found: {expected_derivatives:?}"
    );
    index
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// ivadomed's test_bids_df_anat: target `_lesion-manual`, ROI `_seg-manual`, default extensions, T1w and T2w.
#[test]
fn anat_index_matches_ivadomed_df_ref() {
    let root = shared_data("data-testing");
    let index = check_against_reference(
        std::slice::from_ref(&root),
        BidsOptions {
            target_suffixes: strings(&["_lesion-manual"]),
            roi_suffix: Some("_seg-manual".into()),
            contrasts: strings(&["T1w", "T2w"]),
            ..BidsOptions::default()
        },
        &root.join("df_ref.csv"),
    );
    // sub-unf02 and sub-unf03 have disc labels only: skipped
    assert_eq!(index.subjects(), ["sub-unf01"]);
    let e = &index.entries[0];
    assert_eq!(e.metadata["Manufacturer"], "Siemens");
    assert_eq!(
        e.metadata["ImageType"],
        "['ORIGINAL', 'PRIMARY', 'M', 'NORM', 'DIS3D', 'DIS2D']"
    );
    assert_eq!(
        e.label,
        Some(root.join("derivatives/labels/sub-unf01/anat/sub-unf01_T1w_lesion-manual.nii.gz"))
    );
    assert_eq!(
        e.roi,
        Some(root.join("derivatives/labels/sub-unf01/anat/sub-unf01_T1w_seg-manual.nii.gz"))
    );
}

/// ivadomed's test_bids_df_microscopy_png: two targets, `.png`, every contrast; sessions, samples, runs, and
/// the samples.tsv / sessions.tsv / scans.tsv merges (sessions' acq_time becomes acq_time_x).
#[test]
fn microscopy_index_matches_ivadomed_df_ref() {
    let root = shared_data("data-testing/microscopy_png");
    let index = check_against_reference(
        std::slice::from_ref(&root),
        BidsOptions {
            target_suffixes: strings(&["_seg-myelin-manual", "_seg-axon-manual"]),
            extensions: strings(&[".png"]),
            ..BidsOptions::default()
        },
        &root.join("df_ref.csv"),
    );
    let run2 = index
        .entries
        .iter()
        .find(|e| e.filename() == "sub-rat3_ses-02_sample-data11_run-2_SEM.png")
        .unwrap();
    // inherited from sub-rat3_ses-02_sample-data11_SEM.json, which names no run
    assert_eq!(run2.metadata["PixelSize"], "[0.1, 0.1]");
    assert_eq!(run2.sidecar, None);
    assert_eq!(run2.targets.len(), 2);
    assert!(run2.targets.iter().all(Option::is_some));
    assert_eq!(index.by_subject_session().len(), 3);
}

/// ivadomed's test_bids_df_multi: two roots, `.nii.gz` and `.png`, a target suffix without its leading `_`.
#[test]
fn multi_root_index_matches_ivadomed_df_ref_multi() {
    let root = shared_data("data-testing");
    let index = check_against_reference(
        &[root.clone(), root.join("microscopy_png")],
        BidsOptions {
            target_suffixes: strings(&["_seg-manual", "seg-axon-manual"]),
            extensions: strings(&[".nii.gz", ".png"]),
            contrasts: strings(&["T1w", "T2w", "SEM"]),
            ..BidsOptions::default()
        },
        &root.join("df_ref_multi.csv"),
    );
    assert_eq!(index.roots.len(), 2);
    assert_eq!(index.contrasts(), ["SEM", "T1w", "T2w"]);
}

/// ivadomed's test_bids_df_ctscan: the `ct` datatype and suffix.
#[test]
fn ct_index_matches_ivadomed_df_ref() {
    let root = shared_data("data-testing/ct_scan");
    let index = check_against_reference(
        std::slice::from_ref(&root),
        BidsOptions {
            target_suffixes: strings(&["_seg-manual"]),
            extensions: strings(&[".nii.gz"]),
            contrasts: strings(&["ct"]),
            ..BidsOptions::default()
        },
        &root.join("df_ref.csv"),
    );
    assert_eq!(index.entries[0].datatype, "ct");
    assert_eq!(index.entries[0].metadata["participant_id"], "sub-spleen2");
}

/// DATA.md: derivatives/labels/sub-unf02/anat/sub-unf01_T1w_seg-manual.nii.gz is not sub-unf02's label
/// (ivadomed's substring match would not pair it either: its name holds sub-unf01's prefix).
#[test]
fn the_misnamed_sub_unf02_label_is_not_matched() {
    let root = shared_data("data_functional_testing");
    let misnamed = root.join("derivatives/labels/sub-unf02/anat/sub-unf01_T1w_seg-manual.nii.gz");
    let index = BidsIndex::build(
        std::slice::from_ref(&root),
        &BidsOptions {
            contrasts: strings(&["T1w"]),
            ..BidsOptions::default()
        },
    )
    .unwrap();
    assert_eq!(index.subjects(), ["sub-unf01", "sub-unf03"]);
    assert!(index.entries.iter().all(|e| e
        .targets
        .iter()
        .chain([&e.roi])
        .all(|t| t.as_ref() != Some(&misnamed))));
    let strict = BidsOptions {
        contrasts: strings(&["T1w"]),
        missing_label: MissingLabel::Error,
        ..BidsOptions::default()
    };
    let msg = format!(
        "{:#}",
        BidsIndex::build(std::slice::from_ref(&root), &strict).unwrap_err()
    );
    assert!(
        msg.contains(
            &root
                .join("sub-unf02/anat/sub-unf02_T1w.nii.gz")
                .display()
                .to_string()
        ),
        "{msg}"
    );
}

/// participants.tsv of data_functional_testing gives every subject sex "unknown": any 2 of the 3 qualify, and
/// the draw depends only on the seed.
#[test]
fn subject_selection_and_balance_are_deterministic_for_a_seed() {
    let root = shared_data("data_functional_testing");
    let options = |seed: u64| BidsOptions {
        contrasts: strings(&["T2w", "T1w"]),
        target_suffixes: strings(&["_lesion-manual"]),
        subject_selection: vec![SubjectSelection {
            n: 2,
            metadata: "sex".into(),
            value: "unknown".into(),
        }],
        balance: BTreeMap::from([("T1w".to_owned(), 0.5)]),
        seed,
        ..BidsOptions::default()
    };
    let mut draws = BTreeSet::new();
    for seed in 0..6 {
        let index = BidsIndex::build(std::slice::from_ref(&root), &options(seed)).unwrap();
        let again = BidsIndex::build(std::slice::from_ref(&root), &options(seed)).unwrap();
        assert_eq!(index, again);
        assert_eq!(index.subjects().len(), 2);
        // 2 subjects: T2w 2 images; T1w balanced to k/2 <= 0.5, i.e. 1 image
        assert_eq!(index.with_contrasts(&strings(&["T2w"])).len(), 2);
        assert_eq!(index.with_contrasts(&strings(&["T1w"])).len(), 1);
        draws.insert(
            index
                .entries
                .iter()
                .map(|e| e.filename())
                .collect::<Vec<_>>(),
        );
    }
    assert!(draws.len() > 1, "{draws:?}");
}

#[test]
fn an_invalid_sidecar_is_an_error_naming_the_file_and_line() {
    let root = tempfile::tempdir().unwrap();
    let source = shared_data("data_functional_testing");
    let anat = root.path().join("sub-unf01/anat");
    fs::create_dir_all(&anat).unwrap();
    fs::copy(
        source.join("sub-unf01/anat/sub-unf01_T2w.nii.gz"),
        anat.join("sub-unf01_T2w.nii.gz"),
    )
    .unwrap();
    let sidecar = anat.join("sub-unf01_T2w.json");
    let text = fs::read_to_string(source.join("sub-unf01/anat/sub-unf01_T2w.json")).unwrap();
    // drop the comma ending line 3, so line 4 starts where serde_json expects `,` or `}`
    let broken: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 2 {
                l.trim_end_matches(',').to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect();
    fs::write(&sidecar, broken.join("\n")).unwrap();
    let msg = format!(
        "{:#}",
        BidsIndex::build(
            &[root.path().to_path_buf()],
            &BidsOptions {
                target_suffixes: vec![],
                ..BidsOptions::default()
            }
        )
        .unwrap_err()
    );
    assert!(
        msg.contains(&sidecar.display().to_string()) && msg.contains("line 4 column"),
        "{msg}"
    );
}

fn script(dir: &Path, body: &str) -> String {
    let path = dir.join("bids.rhai");
    fs::write(&path, body).unwrap();
    path.display().to_string()
}

/// The script primitive takes ivadomed's options, writes the index, and refuses unknown keys by name.
#[test]
fn the_script_bids_primitive_takes_the_loader_options() {
    let dir = tempfile::tempdir().unwrap();
    let data = shared_data("data_functional_testing");
    let out = dir.path().join("run");
    let path = script(
        dir.path(),
        r#"
let d = bids(ARGS[0], #{
    target_suffix: ["_seg-manual", "_lesion-manual"],
    contrasts: ["T1w", "T2w"],
    extensions: [".nii.gz"],
    subject_selection: #{ n: 2, metadata: "sex", value: "unknown" },
    balance: #{ T1w: 1.0 },
    missing_label: "skip",
    random_seed: 3,
    write_index: ARGS[1],
});
print(`images: ${d.len}`);
"#,
    );
    let (ok, stdout, stderr) = run_ivado(
        &["run", &path, data.to_str().unwrap(), out.to_str().unwrap()],
        "warn",
    );
    assert!(ok, "{stderr}");
    // every T1w/T2w image has a seg-manual or a lesion-manual label (sub-unf02's T1w: the lesion only);
    // two of the three subjects are drawn
    assert_eq!(stdout.trim(), "images: 4", "{stderr}");
    // the index is written before the selection, as ivadomed: 6 images and their 11 labels
    let table = read_table(&out.join(INDEX_FILE_NAME));
    assert_eq!(table.rows.len(), 6 + 11);
    assert!(table.header.contains(&"participant_id".to_owned()));

    let (ok, _, stderr) = run_ivado(
        &[
            "run",
            &script(
                dir.path(),
                "bids(ARGS[0], #{ target_suffixes: \"_seg\" });\n",
            ),
            data.to_str().unwrap(),
        ],
        "warn",
    );
    assert!(!ok);
    assert!(
        stderr.contains("unknown option `target_suffixes`"),
        "{stderr}"
    );

    let (ok, _, stderr) = run_ivado(
        &[
            "run",
            &script(
                dir.path(),
                "bids(ARGS[0], #{ contrasts: \"T1w\", missing_label: \"error\" });\n",
            ),
            data.to_str().unwrap(),
        ],
        "warn",
    );
    assert!(!ok);
    assert!(stderr.contains("sub-unf02_T1w.nii.gz"), "{stderr}");
}
