//! `split(...)` in Rhai scripts: ivadomed's split options, the split file written and read back, and ids
//! the file names that the dataset does not have.
use ivado_tests::{run_ivado, shared_data};

const SUBJECTS: &str = r#"
fn subjects(set) {
    let found = [];
    for entry in entries(set) {
        if !found.contains(entry.subject) { found.push(entry.subject); }
    }
    found
}
"#;

fn run_script(dir: &std::path::Path, body: &str, args: &[&str]) -> (bool, String, String) {
    let path = dir.join("split.rhai");
    std::fs::write(&path, format!("{SUBJECTS}{body}")).unwrap();
    let path = path.display().to_string();
    let mut all = vec!["run", path.as_str()];
    all.extend_from_slice(args);
    run_ivado(&all, "warn")
}

#[test]
fn split_options_write_a_split_file_that_reads_back_the_same_split() {
    let dir = tempfile::tempdir().unwrap();
    let data = shared_data("data_functional_testing").display().to_string();
    let out = dir.path().join("out").display().to_string();
    let (ok, stdout, stderr) = run_script(
        dir.path(),
        r#"
let data = bids(ARGS[0], #{ target_suffix: "_seg-manual" });
let drawn = split(data, #{ train_fraction: 0.34, test_fraction: 0.33, random_seed: 6, split_method: "participant_id",
    data_testing: #{ data_type: "participant_id", data_value: ["sub-unf03"] }, path_output: ARGS[1] });
print(`drawn ${subjects(drawn.train)} ${subjects(drawn.valid)} ${subjects(drawn.test)}`);
let read = split(data, #{ fname_split: ARGS[1] + "/split_datasets.json" });
print(`read ${subjects(read.train)} ${subjects(read.valid)} ${subjects(read.test)}`);
"#,
        &[&data, &out],
    );
    assert!(ok, "{stderr}");
    // sub-unf03 is forced into test; the other two are split as scikit-learn's
    // train_test_split(["sub-unf01", "sub-unf02"], train_size=0.34 * 3 / 2, random_state=6) splits them:
    // train ["sub-unf01"], valid ["sub-unf02"] (printed by scikit-learn 1.x).
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            r#"drawn ["sub-unf01"] ["sub-unf02"] ["sub-unf03"]"#,
            r#"read ["sub-unf01"] ["sub-unf02"] ["sub-unf03"]"#
        ],
        "{stderr}"
    );
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/split_datasets.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        file,
        serde_json::json!({"split_method": "participant_id", "train": ["sub-unf01"],
                           "valid": ["sub-unf02"], "test": ["sub-unf03"]})
    );
}

#[test]
fn a_split_file_naming_unknown_subjects_is_refused_at_the_script_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = shared_data("data_functional_testing").display().to_string();
    let file = dir.path().join("split_datasets.json");
    std::fs::write(
        &file,
        r#"{"train": ["sub-unf01"], "valid": ["sub-unf02"], "test": ["sub-unf09"]}"#,
    )
    .unwrap();
    let (ok, _, stderr) = run_script(
        dir.path(),
        "let data = bids(ARGS[0], #{ target_suffix: \"_seg-manual\" });\n\
         let parts = split(data, #{ fname_split: ARGS[1] });\n",
        &[&data, &file.display().to_string()],
    );
    assert!(!ok);
    // The script body starts after the 8 lines of the `subjects` helper.
    assert!(stderr.contains("split.rhai:10:"), "{stderr}");
    assert!(stderr.contains("test: sub-unf09"), "{stderr}");

    let (ok, _, stderr) = run_script(
        dir.path(),
        "let data = bids(ARGS[0], #{ target_suffix: \"_seg-manual\" });\n\
         let parts = split(data, #{ train_fraction: 0.7, test_fraction: 0.4 });\n",
        &[&data],
    );
    assert!(!ok);
    assert!(
        stderr.contains("train_fraction 0.7 + test_fraction 0.4"),
        "{stderr}"
    );
}
