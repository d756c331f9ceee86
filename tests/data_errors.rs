//! Bad input gives a clear error naming the file and what is wrong, through the loaders the pipeline uses
//! (`volume::read_image`, `data::load_pair`), and through Rhai scripts, where the error names the script line
//! too. Every broken file is made in a temp dir from the real data.

use std::path::{Path, PathBuf};

use ivado_runtime::bids::BidsEntry;
use ivado_runtime::data::load_pair;
use ivado_runtime::volume::{
    read_image, read_image_with, write_like, NonFinitePolicy, OutputType, ReadOptions,
};
use ivado_tests::{functional_testing, run_ivado, shared_data};
use tch::Kind;

fn t2w() -> PathBuf {
    shared_data("data_functional_testing/sub-unf01/anat/sub-unf01_T2w.nii.gz")
}

fn t2w_label() -> PathBuf {
    shared_data(
        "data_functional_testing/derivatives/labels/sub-unf01/anat/sub-unf01_T2w_seg-manual.nii.gz",
    )
}

fn entry(image: &Path, label: &Path, sidecar: Option<&Path>) -> BidsEntry {
    BidsEntry {
        subject: "sub-unf01".into(),
        session: None,
        contrast: "T2w".into(),
        image: image.to_path_buf(),
        label: Some(label.to_path_buf()),
        sidecar: sidecar.map(Path::to_path_buf),
        ..Default::default()
    }
}

fn error_of<T: std::fmt::Debug>(result: anyhow::Result<T>) -> String {
    let msg = format!("{:#}", result.unwrap_err());
    eprintln!("{msg}");
    msg
}

/// The real T2w written back uncompressed (`.nii`, float32), so a test can edit its bytes directly:
/// returns the bytes and the voxel data offset.
fn uncompressed_t2w(dir: &Path) -> (Vec<u8>, usize) {
    let vol = read_image(&t2w(), None).unwrap();
    let path = dir.join("plain.nii");
    write_like(&vol, &vol.data, &path, OutputType::F32).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let offset = f32::from_le_bytes(bytes[108..112].try_into().unwrap()) as usize;
    // 131 x 141 x 16 float32 voxels after the header
    assert_eq!(bytes.len(), offset + 131 * 141 * 16 * 4);
    (bytes, offset)
}

#[test]
fn corrupt_gzip_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(t2w()).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    let path = dir.path().join("sub-x_T2w.nii.gz");
    std::fs::write(&path, &bytes).unwrap();
    let msg = error_of(read_image(&path, None));
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("corrupt gzip stream"), "{msg}");

    // a damaged gzip header (bad compression method byte) is also named as gzip corruption
    let mut bytes = std::fs::read(t2w()).unwrap();
    bytes[2] = 0x07;
    std::fs::write(&path, &bytes).unwrap();
    let msg = error_of(read_image(&path, None));
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("corrupt gzip stream"),
        "{msg}"
    );
}

#[test]
fn truncated_gzip_says_expected_and_found_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(t2w()).unwrap();
    let path = dir.path().join("sub-x_T2w.nii.gz");
    std::fs::write(&path, &bytes[..bytes.len() * 3 / 4]).unwrap();
    let msg = error_of(read_image(&path, None));
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    // 131 * 141 * 16 * 4 bytes of float32 voxels expected; fewer decompressed from 3/4 of the file
    let expected = 131 * 141 * 16 * 4;
    assert!(
        msg.contains("file is truncated")
            && msg.contains(&format!("expected {expected} bytes of voxel data"))
            && msg.contains("found "),
        "{msg}"
    );
    let found: usize = msg
        .split("found ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(found > 0 && found < expected, "{found}");

    // an uncompressed file cut inside the voxel data: the exact count is known
    let (plain, offset) = uncompressed_t2w(dir.path());
    let cut = dir.path().join("cut.nii");
    std::fs::write(&cut, &plain[..offset + 1000]).unwrap();
    let msg = error_of(read_image(&cut, None));
    assert!(
        msg.contains(&cut.display().to_string())
            && msg.contains(&format!("expected {expected} bytes"))
            && msg.contains("found 1000"),
        "{msg}"
    );
}

#[test]
fn text_file_named_nii_gz() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub-x_T2w.nii.gz");
    std::fs::write(&path, "subject,age\nsub-unf01,32\n".repeat(30)).unwrap();
    let msg = error_of(read_image(&path, None));
    assert!(
        msg.contains(&path.display().to_string())
            && msg.contains("not a NIfTI-1 file: sizeof_hdr is")
            && msg.contains("expected 348")
            && msg.contains("not gzip-compressed"),
        "{msg}"
    );
    // right size field but no magic: an Analyze 7.5 header, or a damaged one
    let (mut plain, _) = uncompressed_t2w(dir.path());
    plain[344..348].copy_from_slice(b"xyz\0");
    let bad_magic = dir.path().join("bad_magic.nii");
    std::fs::write(&bad_magic, &plain).unwrap();
    let msg = error_of(read_image(&bad_magic, None));
    assert!(
        msg.contains(&bad_magic.display().to_string()) && msg.contains("bad magic"),
        "{msg}"
    );
}

#[test]
fn nan_and_inf_voxels_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut plain, offset) = uncompressed_t2w(dir.path());
    // 3 NaN and 2 infinite voxels at distinct places
    for (i, value) in [
        (0usize, f32::NAN),
        (1000, f32::NAN),
        (5000, f32::INFINITY),
        (7000, f32::NAN),
        (9000, f32::NEG_INFINITY),
    ] {
        plain[offset + 4 * i..offset + 4 * i + 4].copy_from_slice(&value.to_le_bytes());
    }
    let path = dir.path().join("sub-x_T2w.nii");
    std::fs::write(&path, &plain).unwrap();
    let msg = error_of(read_image(&path, None));
    assert!(
        msg.contains(&path.display().to_string())
            && msg.contains("5 of 295536 voxels are not finite (3 NaN, 2 infinite)"),
        "{msg}"
    );
    // the opt-in policy zeroes them and keeps every other voxel
    let replaced = read_image_with(
        &path,
        None,
        ReadOptions {
            non_finite: NonFinitePolicy::ReplaceWithZero,
        },
    )
    .unwrap();
    let original = read_image(&t2w(), None).unwrap();
    // RAS already, so canonical order is file order; flatten both in Fortran order (x fastest)
    assert!(original.reorientation.is_identity());
    let flat = |t: &tch::Tensor| {
        Vec::<f32>::try_from(&t.permute([2, 1, 0]).contiguous().view([-1])).unwrap()
    };
    let mut expected = flat(&original.data);
    for i in [0, 1000, 5000, 7000, 9000] {
        expected[i] = 0.0;
    }
    assert_eq!(flat(&replaced.data), expected);
}

#[test]
fn four_d_volume_is_refused_but_a_singleton_fourth_dim_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, offset) = uncompressed_t2w(dir.path());
    let set_dims = |bytes: &mut Vec<u8>, ndim: u16, t: u16| {
        bytes[40..42].copy_from_slice(&ndim.to_le_bytes());
        bytes[48..50].copy_from_slice(&t.to_le_bytes());
    };
    // two volumes in time: header dim[0] = 4, dim[4] = 2, the voxel data twice
    let mut four = plain.clone();
    set_dims(&mut four, 4, 2);
    four.extend_from_slice(&plain[offset..]);
    let path = dir.path().join("sub-x_bold.nii");
    std::fs::write(&path, &four).unwrap();
    let msg = error_of(read_image(&path, None));
    assert!(
        msg.contains(&path.display().to_string())
            && msg.contains("4D volume of shape [131, 141, 16, 2] where a 3D volume is expected"),
        "{msg}"
    );
    // dim[4] = 1 is one 3D volume
    let mut single = plain.clone();
    set_dims(&mut single, 4, 1);
    let path = dir.path().join("sub-x_T2w.nii");
    std::fs::write(&path, &single).unwrap();
    let vol = read_image(&path, None).unwrap();
    assert!(vol.data.equal(&read_image(&t2w(), None).unwrap().data));
}

#[test]
fn image_and_label_must_overlay() {
    let dir = tempfile::tempdir().unwrap();
    // the right pair loads
    let (image, label) = load_pair(&entry(&t2w(), &t2w_label(), None)).unwrap();
    assert_eq!(image.shape(), label.shape());

    // another subject's label: 45 x 45 x 2 against 131 x 141 x 16
    let other = shared_data("data-testing/sub-unf02/anat/sub-unf02_T2star.nii.gz");
    let msg = error_of(load_pair(&entry(&t2w(), &other, None)));
    assert!(
        msg.contains(&t2w().display().to_string())
            && msg.contains(&other.display().to_string())
            && msg.contains("has shape [131, 141, 16]")
            && msg.contains("[45, 45, 2]"),
        "{msg}"
    );

    // the label shifted by 2 mm along x (srow_x[3], bytes 292..296)
    let vol = read_image(&t2w_label(), None).unwrap();
    let plain_label = dir.path().join("label.nii");
    write_like(&vol, &vol.data, &plain_label, OutputType::U8).unwrap();
    let mut bytes = std::fs::read(&plain_label).unwrap();
    let x = f32::from_le_bytes(bytes[292..296].try_into().unwrap());
    bytes[292..296].copy_from_slice(&(x + 2.0).to_le_bytes());
    let shifted = dir.path().join("shifted_seg-manual.nii");
    std::fs::write(&shifted, &bytes).unwrap();
    let msg = error_of(load_pair(&entry(&t2w(), &shifted, None)));
    assert!(
        msg.contains(&shifted.display().to_string())
            && msg.contains("different affines")
            && msg.contains("largest difference 2.000e0 mm"),
        "{msg}"
    );
}

#[test]
fn invalid_sidecar_json_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = dir.path().join("sub-unf01_T2w.json");
    // a trailing comma: serde_json stops at the closing brace, line 4, column 1
    std::fs::write(
        &sidecar,
        "{\n  \"RepetitionTime\": 2.5,\n  \"EchoTime\": 0.1,\n}\n",
    )
    .unwrap();
    let msg = error_of(load_pair(&entry(&t2w(), &t2w_label(), Some(&sidecar))));
    assert!(
        msg.contains(&sidecar.display().to_string())
            && msg.contains("invalid JSON")
            && msg.contains("line 4:1"),
        "{msg}"
    );
}

#[test]
fn microscopy_pair_loads_in_mm_and_binary() {
    let micr = |rel: &str| shared_data(&format!("data-testing/microscopy_png/{rel}"));
    let image = micr("sub-rat3/ses-01/micr/sub-rat3_ses-01_sample-data9_SEM.png");
    let label = micr(
        "derivatives/labels/sub-rat3/ses-01/micr/sub-rat3_ses-01_sample-data9_SEM_seg-myelin-manual.png",
    );
    let sidecar = micr("sub-rat3/ses-01/micr/sub-rat3_ses-01_sample-data9_SEM.json");
    for sidecar in [Some(sidecar.as_path()), None] {
        let (img, lab) = load_pair(&entry(&image, &label, sidecar)).unwrap();
        // 764 wide, 756 high; PixelSize [0.1, 0.2] um = [X, Y] -> rows 0.2 um = 2e-4 mm
        assert_eq!(img.shape(), [756, 764, 1]);
        assert_eq!(img.spacing, [2e-4, 1e-4, 1e-4]);
        assert_eq!(lab.spacing, img.spacing);
        let ones = lab.data.eq(1.0).sum(Kind::Int64).int64_value(&[]);
        let zeros = lab.data.eq(0.0).sum(Kind::Int64).int64_value(&[]);
        assert!(ones > 0 && ones + zeros == 756 * 764);
    }

    // a microscopy image whose sidecar lacks PixelSize
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sub-rat9_sample-a_SEM.png");
    std::fs::copy(&image, &copy).unwrap();
    let json = dir.path().join("sub-rat9_sample-a_SEM.json");
    std::fs::write(&json, "{\"BodyPart\": \"CSPINE\"}").unwrap();
    let msg = error_of(load_pair(&entry(&copy, &label, Some(&json))));
    assert!(
        msg.contains(&copy.display().to_string())
            && msg.contains(&json.display().to_string())
            && msg.contains("no PixelSize"),
        "{msg}"
    );
}

/// Runs `body` as the Rhai script `dir/name.rhai` with `args` as its ARGS; returns (success, stderr, script).
fn run_script(dir: &Path, name: &str, body: &str, args: &[&str]) -> (bool, String, PathBuf) {
    let script = dir.join(format!("{name}.rhai"));
    std::fs::write(&script, body).unwrap();
    let mut command = vec!["run", script.to_str().unwrap()];
    command.extend_from_slice(args);
    let (ok, _, stderr) = run_ivado(&command, "warn");
    eprintln!("{stderr}");
    (ok, stderr, script)
}

#[test]
fn an_unknown_contrast_is_refused_at_the_script_line_naming_the_contrasts_there() {
    let dir = tempfile::tempdir().unwrap();
    let root = functional_testing();
    let (ok, stderr, script) = run_script(
        dir.path(),
        "unknown_contrast",
        "// T9w is no contrast of the dataset\n\
         let data = bids(ARGS[0], #{ contrasts: [\"T2w\", \"T9w\"], target_suffix: \"_seg-manual\" });\n\
         print(data.len());\n",
        &[root.to_str().unwrap()],
    );
    assert!(!ok, "{stderr}");
    // line 2 is the `bids` call; the contrasts there are the image suffixes of data_functional_testing
    assert!(
        stderr.contains(&format!("{}:2:", script.display()))
            && stderr.contains("unknown contrast `T9w`")
            && stderr.contains(&root.display().to_string())
            && stderr.contains("contrasts there: T1w, T2star, T2w"),
        "{stderr}"
    );
}

#[test]
fn a_subject_selection_keeping_no_subject_is_refused_at_the_script_line() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stderr, script) = run_script(
        dir.path(),
        "no_subject",
        "let data = bids(ARGS[0], #{\n\
             contrasts: [\"T2w\"],\n\
             subject_selection: #{ n: 1, metadata: \"sex\", value: \"F\" },\n\
         });\n\
         print(data.len());\n",
        &[functional_testing().to_str().unwrap()],
    );
    assert!(!ok, "{stderr}");
    // participants.tsv gives every subject sex "unknown": none is "F"
    assert!(
        stderr.contains(&format!("{}:1:", script.display()))
            && stderr.contains("subject_selection kept no subject, so no image is left")
            && stderr.contains("sex == \"F\": 0 subject(s) of the 1 asked for"),
        "{stderr}"
    );
}

/// A BIDS dataset under `dir` of sub-unf01's and sub-unf02's real T2w images with all-zero `_seg-manual`
/// labels on their grids.
fn dataset_with_empty_labels(dir: &Path) -> PathBuf {
    let root = dir.join("empty_labels");
    for subject in ["sub-unf01", "sub-unf02"] {
        let name = format!("{subject}_T2w.nii.gz");
        let image = shared_data(&format!("data_functional_testing/{subject}/anat/{name}"));
        let anat = root.join(subject).join("anat");
        std::fs::create_dir_all(&anat).unwrap();
        std::fs::copy(&image, anat.join(&name)).unwrap();
        let labels = root.join("derivatives/labels").join(subject).join("anat");
        std::fs::create_dir_all(&labels).unwrap();
        let volume = read_image(&image, None).unwrap();
        let label = labels.join(format!("{subject}_T2w_seg-manual.nii.gz"));
        write_like(&volume, &volume.data.zeros_like(), &label, OutputType::U8).unwrap();
        let written = read_image(&label, None).unwrap();
        assert_eq!(written.data.count_nonzero(None).int64_value(&[]), 0);
    }
    root
}

#[test]
fn a_slice_filter_leaving_no_slice_is_refused_at_the_script_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dataset_with_empty_labels(dir.path());
    let out = dir.path().join("run");
    let (ok, stderr, script) = run_script(
        dir.path(),
        "filter_everything",
        "let data = bids(ARGS[0], #{ contrasts: [\"T2w\"], target_suffix: \"_seg-manual\" });\n\
         let model = model(\"unet2d\", #{ n_filters: 4, depth: 2 });\n\
         train(model, #{\n\
             train: subset(data, [\"sub-unf01\"]), valid: subset(data, [\"sub-unf02\"]),\n\
             preprocess: [transform(\"CenterCrop\", #{ size: [32, 32] })],\n\
             slice_filter_params: #{ filter_empty_mask: true },\n\
             epochs: 1, out: ARGS[1],\n\
         });\n",
        &[root.to_str().unwrap(), out.to_str().unwrap()],
    );
    assert!(!ok, "{stderr}");
    // Every label is empty, so filter_empty_mask drops every slice: line 3 is the `train` call.
    assert!(
        stderr.contains(&format!("{}:3:", script.display()))
            && stderr.contains("no sample left to train on")
            && stderr.contains("every window filtered out"),
        "{stderr}"
    );
    assert!(
        !out.join("model").exists(),
        "nothing was trained, so no model folder"
    );
}
