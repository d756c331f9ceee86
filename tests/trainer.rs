//! Training step by step from Rhai (`trainer(net, #{...})`), and losses written in Rhai (`script_loss`).
use ivado_runtime::losses::Loss;
use ivado_runtime::phantom;
use ivado_tests::run_ivado;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// ivadomed's DiceLoss (smooth 1) written in Rhai, a per-channel Dice (MultiClassDiceLoss) using axis
/// reductions, BCE with the log clamped at -100 as torch's BCELoss does, and two broken losses. The line
/// numbers of `broken` matter to the error test.
const LOSSES: &str = r#"// Rhai losses for tests/trainer.rs
fn soft_dice(prediction, target) {
    let intersection = (prediction * target).sum();
    -(2.0 * intersection + 1.0) / (prediction.sum() + target.sum() + 1.0)
}

fn broken(prediction, target) {
    let p = prediction.clamp(0.0, 1.0);
    p * target.no_such_property
}

fn per_channel_dice(prediction, target) {
    let axes = [];
    for axis in 0..prediction.ndim() {
        if axis != 1 { axes.push(axis); }
    }
    let dice = ((prediction * target).sum(axes) * 2 + 1) / (prediction.sum(axes) + target.sum(axes) + 1);
    -dice.mean()
}

fn bce(prediction, target) {
    let positive = target * prediction.log().clamp_min(-100);
    let negative = (1 - target) * (1 - prediction).log().clamp_min(-100);
    -(positive + negative).mean()
}

fn as_number(prediction, target) {
    (prediction - target).square().sum().item()
}
"#;

/// A folder with the loss file, a small phantom dataset (4 subjects of 40 x 40 x 8, T2w) and scripts.
struct Fixture {
    _root: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().to_owned();
    let data = path.join("data");
    phantom::generate(
        &data,
        &phantom::PhantomSpec {
            subjects: 4,
            shape: [40, 40, 8],
            contrasts: vec!["T2w".into()],
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::write(path.join("losses.rhai"), LOSSES).unwrap();
    Fixture {
        _root: root,
        root: path,
        data,
    }
}

/// Script lines shared by the scripts below: the data split, preprocessing and training options.
/// `ARGS[0]` is the output folder, `ARGS[1]` the dataset.
const PRELUDE: &str = r#"
let dataset = bids(ARGS[1], #{ target_suffix: "_seg-manual", contrasts: ["T2w"] });
let parts = split(dataset, #{ train_fraction: 0.5, test_fraction: 0.0, random_seed: 1 });
let preprocess = [transform("CenterCrop", #{ size: [32, 32] }), transform("NormalizeInstance", #{})];
let options = #{ train: parts.train, valid: parts.valid, preprocess: preprocess, batch_size: 8, seed: 3,
                 learning_rate: 0.003 };
"#;

impl Fixture {
    /// Runs `body` (after [`PRELUDE`]) as `<root>/<name>` with the built binary.
    fn run(&self, name: &str, body: &str) -> (bool, String, String) {
        let script = self.root.join(name);
        std::fs::write(&script, format!("{PRELUDE}{body}")).unwrap();
        run_ivado(
            &[
                "run",
                script.to_str().unwrap(),
                self.root.to_str().unwrap(),
                self.data.to_str().unwrap(),
            ],
            "warn",
        )
    }
}

/// metrics.csv as rows of cells, header dropped.
fn metrics(run: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| line.split(',').map(str::to_owned).collect())
        .collect()
}

/// The columns of metrics.csv that must repeat between equivalent runs: train_loss, valid_loss, valid_dice.
fn scores(run: &Path) -> Vec<Vec<String>> {
    metrics(run)
        .into_iter()
        .map(|row| row[1..4].to_vec())
        .collect()
}

/// A CSV written by the script's `write_csv`, as one map per row.
fn read_rows(path: &Path) -> Vec<std::collections::BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|line| {
            header
                .iter()
                .map(|h| h.to_string())
                .zip(line.split(',').map(str::to_owned))
                .collect()
        })
        .collect()
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_script_steps_through_epochs_stops_by_its_own_rule_and_matches_train() {
    let fixture = fixture();
    // Reference: `train` for 3 epochs. Then `trainer` over the same start (same seed before building the
    // net), configured for 10 epochs, stepped by the script, which stops on its own rule: the first epoch
    // whose validation Dice does not beat the best so far, and at the latest after 3 epochs. A third run
    // uses the built-in early stopping, which an epsilon of 100 trips at epoch 2.
    let body = r#"
seed(5);
let reference = train(model("unet2d", #{ depth: 2, n_filters: 8 }), options + #{ epochs: 3, out: ARGS[0] + "/reference" });
seed(5);
let t = trainer(model("unet2d", #{ depth: 2, n_filters: 8 }), options + #{ epochs: 10, out: ARGS[0] + "/stepped" });
if t.finished || t.next_epoch != 1 || t.epochs != 10 { throw `fresh trainer: ${t}`; }
let records = [];
let best = -1.0;
while !t.finished {
    let record = t.run_epoch();
    records.push(record);
    let improved = record.valid_dice > best;
    if improved { best = record.valid_dice; }
    if !improved || record.epoch >= 3 { t.stop(); }
}
write_csv(ARGS[0] + "/records.csv", records);
if t.history.len() != records.len() { throw "history"; }
let again = "ran";
try { t.run_epoch(); } catch (error) { again = `refused: ${error}`; }
print(again);
let report = t.report();
print(`report stopped_by_script=${report.stopped_by_script} stopped_early=${report.stopped_early} best_epoch=${report.best_epoch} epochs=${report.history.len()}`);

let early = trainer(model("unet2d", #{ depth: 2, n_filters: 8 }), options + #{ epochs: 10, out: ARGS[0] + "/early",
                    early_stopping_patience: 1, early_stopping_epsilon: 100.0 });
let flags = [];
while !early.finished { flags.push(early.run_epoch().stopped_early); }
print(`early stopping flags ${flags} stopped_early=${early.report().stopped_early}`);
"#;
    let (ok, stdout, stderr) = fixture.run("stepped.rhai", body);
    assert!(ok, "{stdout}\n{stderr}");

    let stepped = fixture.root.join("stepped");
    let rows = metrics(&stepped);
    // The rule, recomputed from metrics.csv: stop at the first epoch (from 2 on) whose Dice is not above the
    // best before it, else at epoch 3.
    let dice: Vec<f64> = rows.iter().map(|r| r[3].parse().unwrap()).collect();
    let mut expected_epochs = 3;
    for epoch in 2..=dice.len() {
        let best_before = dice[..epoch - 1].iter().cloned().fold(f64::MIN, f64::max);
        if dice[epoch - 1] <= best_before {
            expected_epochs = epoch;
            break;
        }
    }
    assert_eq!(rows.len(), expected_epochs, "{rows:?}");

    // Each record the script got is the epoch's row of metrics.csv (written with 6 decimals).
    let records = read_rows(&fixture.root.join("records.csv"));
    assert_eq!(records.len(), rows.len());
    for (index, (record, row)) in records.iter().zip(&rows).enumerate() {
        assert_eq!(record["epoch"], (index + 1).to_string());
        assert_eq!(record["stopped_early"], "false");
        let value = |key: &str| record[key].parse::<f64>().unwrap();
        assert_eq!(format!("{:.6}", value("train_loss")), row[1]);
        assert_eq!(format!("{:.6}", value("valid_loss")), row[2]);
        assert_eq!(format!("{:.6}", value("valid_dice")), row[3]);
        assert_eq!(value("learning_rate"), 0.003);
        assert_eq!(format!("{:.3}", value("seconds")), row[5]);
    }

    // Stepping trains exactly as `train` does: the same scores, epoch for epoch.
    let reference = scores(&fixture.root.join("reference"));
    assert_eq!(scores(&stepped), reference[..rows.len()].to_vec());

    assert!(
        stdout.contains("refused: ") && stdout.contains("training is finished after"),
        "{stdout}"
    );
    let best_epoch = 1
        + (0..dice.len())
            .max_by(|a, b| dice[*a].total_cmp(&dice[*b]).then(b.cmp(a)))
            .unwrap();
    assert!(
        stdout.contains(&format!(
            "report stopped_by_script=true stopped_early=false best_epoch={best_epoch} epochs={}",
            rows.len()
        )),
        "{stdout}"
    );
    let manifest = json_file(&stepped.join("manifest.json"));
    assert_eq!(manifest["stopped_by_caller"], true);
    assert!(manifest["total_seconds"].as_f64().unwrap() > 0.0);
    assert!(stepped
        .join(format!("checkpoints/epoch-{:04}", rows.len()))
        .is_dir());

    // Epoch 1 sets the best validation loss; epoch 2 cannot beat it by 100, and patience 1 stops the run.
    assert!(
        stdout.contains("early stopping flags [false, true] stopped_early=true"),
        "{stdout}"
    );
    assert_eq!(metrics(&fixture.root.join("early")).len(), 2);
}

/// Rhai soft Dice and the built-in DiceLoss, trained from the same start: same scores every epoch, the loss
/// falls, and the run records the loss's source text.
#[test]
fn a_rhai_dice_loss_trains_like_the_builtin_one_and_is_recorded() {
    let fixture = fixture();
    let body = r#"
seed(5);
train(model("unet2d", #{ depth: 2, n_filters: 8 }), options + #{ epochs: 3, out: ARGS[0] + "/builtin", loss: #{ name: "DiceLoss" } });
seed(5);
let t = trainer(model("unet2d", #{ depth: 2, n_filters: 8 }), options + #{ epochs: 3, out: ARGS[0] + "/script",
                loss: script_loss("losses.rhai", "soft_dice") });
while !t.finished { t.run_epoch(); }
"#;
    let (ok, stdout, stderr) = fixture.run("rhai_loss.rhai", body);
    assert!(ok, "{stdout}\n{stderr}");
    let script_run = fixture.root.join("script");
    let builtin = scores(&fixture.root.join("builtin"));
    let script = scores(&script_run);
    assert_eq!(script.len(), 3);
    // The Rhai function does the same tensor ops in the same order as DiceLoss: equal to the printed digits.
    assert_eq!(script, builtin);
    let train_loss: Vec<f64> = script.iter().map(|r| r[0].parse().unwrap()).collect();
    assert!(train_loss[2] < train_loss[0], "{train_loss:?}");

    // The manifest and the model folder hold the loss itself, not just a path.
    let expected = json!({
        "name": "ScriptLoss",
        "path": fixture.root.join("losses.rhai").display().to_string(),
        "function": "soft_dice",
        "source": LOSSES,
    });
    let manifest = json_file(&script_run.join("manifest.json"));
    assert_eq!(manifest["training"]["loss"], expected);
    let model = json_file(&script_run.join("model/ivado_model.json"));
    assert_eq!(model["training"]["loss"], expected);
}

#[test]
fn errors_in_a_rhai_loss_point_at_the_loss_file() {
    let fixture = fixture();
    let losses = fixture.root.join("losses.rhai").display().to_string();
    let main = |name: &str| fixture.root.join(name).display().to_string();

    // A run-time error inside the loss: the loss file's line 9 (`target.no_such_property`), reached from
    // the script's `train` call on its line 7 (the prelude's 6 lines come first).
    let (ok, _, stderr) = fixture.run(
        "runtime_error.rhai",
        r#"train(model("unet2d", #{ depth: 2, n_filters: 8 }), options + #{ epochs: 1, out: ARGS[0] + "/a", loss: script_loss("losses.rhai", "broken") });"#,
    );
    assert!(!ok);
    assert!(
        stderr.contains(&format!("{}:7:", main("runtime_error.rhai"))),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{losses}:9:")), "{stderr}");
    assert!(stderr.contains("no_such_property"), "{stderr}");

    // A syntax error is reported when `script_loss` compiles the file, at the file's line 3.
    std::fs::write(
        fixture.root.join("syntax.rhai"),
        "fn f(prediction, target) {\n    let x = 1;\n    let y = (x + ;\n}\n",
    )
    .unwrap();
    let (ok, _, stderr) = fixture.run("syntax_error.rhai", r#"script_loss("syntax.rhai", "f");"#);
    assert!(!ok);
    let syntax = fixture.root.join("syntax.rhai").display().to_string();
    assert!(stderr.contains(&format!("{syntax}:3:")), "{stderr}");

    // A function with the wrong parameters, and a loss that returns a number (no gradient).
    let (ok, _, stderr) = fixture.run("arity.rhai", r#"script_loss("losses.rhai", "nothing");"#);
    assert!(!ok);
    assert!(
        stderr.contains("no function `nothing(prediction, target)` taking 2 arguments"),
        "{stderr}"
    );
    assert!(stderr.contains("soft_dice(prediction, target)"), "{stderr}");
    let (ok, _, stderr) = fixture.run(
        "number.rhai",
        r#"train(model("unet2d", #{ depth: 2, n_filters: 8 }), options + #{ epochs: 1, out: ARGS[0] + "/b", loss: script_loss("losses.rhai", "as_number") });"#,
    );
    assert!(!ok);
    assert!(
        stderr.contains("loss `as_number` must return a scalar Tensor, but it returned f64"),
        "{stderr}"
    );
}

fn script_loss(function: &str) -> Loss {
    Loss::from_config(&json!({
        "name": "ScriptLoss", "path": "losses.rhai", "function": function, "source": LOSSES,
    }))
    .unwrap()
}

/// The loss value and the gradient with respect to the prediction.
fn value_and_gradient(loss: &Loss, prediction: &Tensor, target: &Tensor) -> (f64, Tensor) {
    let prediction = prediction.detach().set_requires_grad(true);
    let value = loss.compute(&prediction, target).unwrap();
    assert_eq!(value.dim(), 0, "{} is not a scalar", loss.name());
    value.backward();
    (value.double_value(&[]), prediction.grad())
}

fn assert_same_loss(rhai: &Loss, builtin: &Loss, prediction: &Tensor, target: &Tensor) {
    let (a, grad_a) = value_and_gradient(rhai, prediction, target);
    let (b, grad_b) = value_and_gradient(builtin, prediction, target);
    assert!(
        (a - b).abs() < 1e-6,
        "{rhai:?}: {a} vs {} {b}",
        builtin.name()
    );
    let difference = (grad_a - &grad_b).abs().max().double_value(&[]);
    assert!(
        difference < 1e-6,
        "{rhai:?}: gradients differ by {difference}"
    );
    assert!(grad_b.abs().sum(Kind::Double).double_value(&[]) > 0.0);
}

#[test]
fn rhai_losses_equal_the_builtin_ones_in_value_and_gradient() {
    tch::manual_seed(11);
    let options = (Kind::Float, Device::Cpu);
    let dice = Loss::from_config(&json!({"name": "DiceLoss"})).unwrap();
    for shape in [[2i64, 1, 6, 5].as_slice(), [1, 2, 3, 4, 4].as_slice()] {
        let prediction = Tensor::randn(shape, options).sigmoid();
        let target = Tensor::rand(shape, options).gt(0.6).to_kind(Kind::Float);
        assert_same_loss(&script_loss("soft_dice"), &dice, &prediction, &target);
        assert_same_loss(
            &script_loss("per_channel_dice"),
            &Loss::from_config(&json!({"name": "MultiClassDiceLoss"})).unwrap(),
            &prediction,
            &target,
        );
        assert_same_loss(
            &script_loss("bce"),
            &Loss::from_config(&json!({"name": "BinaryCrossEntropyLoss"})).unwrap(),
            &prediction,
            &target,
        );
        // Inside a LossCombination, next to a built-in loss.
        let combined = Loss::from_config(&json!({"name": "LossCombination", "losses": [
            {"name": "ScriptLoss", "path": "losses.rhai", "function": "soft_dice", "source": LOSSES},
            {"name": "L2loss"}], "weights": [2.0, 0.5]}))
        .unwrap();
        let builtin = Loss::from_config(&json!({"name": "LossCombination", "losses": [
            {"name": "DiceLoss"}, {"name": "L2loss"}], "weights": [2.0, 0.5]}))
        .unwrap();
        assert_same_loss(&combined, &builtin, &prediction, &target);
    }

    // One case by hand: p = [0.5, 0.25], t = [1, 0]: -(2·0.5 + 1) / (0.75 + 1 + 1) = -2 / 2.75.
    let prediction = Tensor::from_slice(&[0.5f32, 0.25]).view([1, 1, 2]);
    let target = Tensor::from_slice(&[1.0f32, 0.0]).view([1, 1, 2]);
    let (value, gradient) = value_and_gradient(&script_loss("soft_dice"), &prediction, &target);
    assert!((value + 2.0 / 2.75).abs() < 1e-6, "{value}");
    // d/dp_i of -(2 Σpt + 1) / (Σp + Σt + 1) = -(2 t_i D - N) / D² with N = 2, D = 2.75.
    let expected = [-(2.0 * 2.75 - 2.0) / 2.75f64.powi(2), 2.0 / 2.75f64.powi(2)];
    let gradient = Vec::<f32>::try_from(gradient.flatten(0, -1)).unwrap();
    for (got, want) in gradient.iter().zip(expected) {
        assert!(
            (*got as f64 - want).abs() < 1e-6,
            "{gradient:?} vs {expected:?}"
        );
    }
}

#[test]
fn a_rhai_loss_without_source_reads_its_file_and_checks_its_result() {
    let fixture = fixture();
    let path = fixture.root.join("losses.rhai");
    let from_file = Loss::from_config(&json!({
        "name": "ScriptLoss", "path": path.display().to_string(), "function": "soft_dice",
    }))
    .unwrap();
    let with_source = Loss::from_config(&json!({
        "name": "ScriptLoss", "path": path.display().to_string(), "function": "soft_dice", "source": LOSSES,
    }))
    .unwrap();
    assert_eq!(from_file, with_source);
    let filled =
        ivado_runtime::losses::with_script_sources(&json!({"name": "LossCombination", "losses": [
        {"name": "ScriptLoss", "path": path.display().to_string(), "function": "soft_dice"}]}))
        .unwrap();
    assert_eq!(filled["losses"][0]["source"], LOSSES);

    let error = |config: Value| format!("{:#}", Loss::from_config(&config).unwrap_err());
    assert!(error(json!({"name": "ScriptLoss", "function": "f"})).contains("needs a `path`"));
    assert!(
        error(json!({"name": "ScriptLoss", "path": "x.rhai", "function": "f", "smooth": 1}))
            .contains("unknown parameter `smooth`")
    );

    // A loss must be a scalar: the unreduced elementwise product is refused, naming its shape.
    let unreduced = Loss::from_config(&json!({
        "name": "ScriptLoss", "path": "u.rhai", "function": "u",
        "source": "fn u(prediction, target) { prediction * target }",
    }))
    .unwrap();
    let p = Tensor::ones([1, 1, 2, 2], (Kind::Float, Device::Cpu));
    let message = format!("{:#}", unreduced.compute(&p, &p).unwrap_err());
    assert!(message.contains("shape [1, 1, 2, 2]"), "{message}");
    // A loss cut off from the prediction's graph cannot train.
    let detached = Loss::from_config(&json!({
        "name": "ScriptLoss", "path": "d.rhai", "function": "d",
        "source": "fn d(prediction, target) { (prediction.detach() - target).square().mean() }",
    }))
    .unwrap();
    let p = p.set_requires_grad(true);
    let message = format!("{:#}", detached.compute(&p, &p.detach()).unwrap_err());
    assert!(
        message.contains("does not depend differentiably"),
        "{message}"
    );
}
