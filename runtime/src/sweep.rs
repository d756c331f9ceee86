//! Hyperparameter sweeps and model comparison: ivadomed's `ivadomed_automate_training` and
//! `ivadomed_compare_models`, for Rhai scripts.
//!
//! A sweep file names a script and a grid (or a random search space) of parameters. Every configuration runs
//! once per seed as a child `ivado run --param ...` process, each in its own folder
//! `<out>/<config-id>/seed-<n>` (the script gets it as `PARAMS.out`) with its output in `log.txt`. After a
//! child exits 0 having written `metrics.csv`, the sweep writes `done.json` beside it: a run with both is
//! complete and a re-run of the sweep skips it, so an interrupted sweep resumes. Aggregation reads each run's
//! `metrics.csv` (best `valid_dice`) and `evaluation.csv` (mean test `dice`) into `sweep.csv` (one row per
//! run) and `summary.csv` (mean and standard deviation per configuration).
//!
//! With `--slurm` nothing runs: the pending runs become `jobs.txt` and a job-array script `sweep.sbatch`,
//! which writes `done.json` itself after each successful task; `--collect` then only aggregates.
use crate::stats::{self, PairedT, Wilcoxon, WilcoxonMethod};
use anyhow::{anyhow, bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Written into a run folder by the sweep (or the Slurm script) once the run finished successfully.
pub const DONE_FILE: &str = "done.json";
pub const METRICS_FILE: &str = "metrics.csv";
pub const EVALUATION_FILE: &str = "evaluation.csv";
pub const LOG_FILE: &str = "log.txt";
/// Parameter names the sweep sets itself.
const RESERVED: [&str; 2] = ["seed", "out"];
/// Log lines shown for a failed run.
const FAILURE_TAIL_LINES: usize = 12;

// ---------------------------------------------------------------------------------------------------------
// Script parameters: `--param key=value`.

/// Parses a parameter value: integer, float, `true`/`false`, JSON (an array, object or quoted string), or else
/// the text itself as a string.
pub fn parse_param_value(text: &str) -> Result<Value> {
    match text {
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        _ => {}
    }
    if let Ok(integer) = text.parse::<i64>() {
        return Ok(Value::from(integer));
    }
    if let Ok(float) = text.parse::<f64>() {
        // "nan" and "inf" parse as floats but have no JSON form: keep them as text.
        if float.is_finite() {
            return Ok(Value::from(float));
        }
    }
    if text.starts_with(['[', '{', '"']) {
        return serde_json::from_str(text)
            .with_context(|| format!("`{text}` starts like JSON but is not valid JSON"));
    }
    Ok(Value::String(text.to_owned()))
}

/// The inverse of [`parse_param_value`]: text that parses back to `value`.
pub fn format_param_value(value: &Value) -> String {
    match value {
        Value::String(text) => {
            let plain = parse_param_value(text).ok();
            if plain.as_ref() == Some(value) {
                text.clone()
            } else {
                // "3", "true" or "[x" would come back as something else: quote them.
                value.to_string()
            }
        }
        other => other.to_string(),
    }
}

fn check_param_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        bail!("parameter name `{name}` must be letters, digits and `_`, not starting with a digit");
    }
    Ok(())
}

/// Parses `key=value`.
pub fn parse_param(text: &str) -> Result<(String, Value)> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| anyhow!("--param `{text}`: expected KEY=VALUE"))?;
    check_param_name(name).with_context(|| format!("--param `{text}`"))?;
    let value = parse_param_value(value).with_context(|| format!("--param `{text}`"))?;
    Ok((name.to_owned(), value))
}

/// The `PARAMS` map of `ivado run --param ...`; a key given twice is an error.
pub fn parse_params(texts: &[String]) -> Result<serde_json::Map<String, Value>> {
    let mut params = serde_json::Map::new();
    for text in texts {
        let (name, value) = parse_param(text)?;
        if params.insert(name.clone(), value).is_some() {
            bail!("--param `{name}` is given twice");
        }
    }
    Ok(params)
}

// ---------------------------------------------------------------------------------------------------------
// The sweep file.

/// A JSON object with its keys in file order (serde_json's map is sorted unless the workspace enables
/// `preserve_order`), so configuration names follow the order the user wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrderedMap(pub Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<OrderedMap, A::Error> {
                let mut entries: Vec<(String, Value)> = Vec::new();
                while let Some((key, value)) = access.next_entry::<String, Value>()? {
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
                    }
                    entries.push((key, value));
                }
                Ok(OrderedMap(entries))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RandomSearch {
    n: usize,
    #[serde(default)]
    seed: u64,
    space: OrderedMap,
}

/// The sweep file as written. Relative paths are relative to the file's folder, and the runs start there.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    script: PathBuf,
    #[serde(default)]
    args: Vec<String>,
    out: PathBuf,
    grid: Option<OrderedMap>,
    random: Option<RandomSearch>,
    /// Parameters every run gets, not part of the configuration name.
    #[serde(default)]
    params: OrderedMap,
    seeds: Option<Vec<i64>>,
    #[serde(default = "one")]
    parallel: usize,
    /// `--device` of each parallel slot in turn (ivadomed's `gpu` list); default: the sweep's own `--device`.
    #[serde(default)]
    devices: Vec<String>,
}

fn one() -> usize {
    1
}

/// One point of the search: the swept parameters' values, and the folder name made from them.
#[derive(Clone, Debug, PartialEq)]
pub struct Configuration {
    pub id: String,
    pub values: Vec<(String, Value)>,
}

/// One process to run: a configuration with a seed.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    pub configuration: usize,
    pub seed: i64,
    pub dir: PathBuf,
}

impl RunSpec {
    pub fn is_complete(&self) -> bool {
        self.dir.join(DONE_FILE).is_file() && self.dir.join(METRICS_FILE).is_file()
    }
}

/// A loaded sweep with every path absolute.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// The folder the sweep file is in: relative paths resolve against it and the runs start in it.
    pub base_dir: PathBuf,
    pub script: PathBuf,
    pub args: Vec<String>,
    pub out: PathBuf,
    pub fixed: Vec<(String, Value)>,
    /// Names of the swept parameters, in file order.
    pub swept: Vec<String>,
    pub configurations: Vec<Configuration>,
    pub seeds: Vec<i64>,
    pub parallel: usize,
    pub devices: Vec<String>,
}

/// Characters kept in a folder name; everything else becomes `-`.
fn filesystem_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A value as it appears in a configuration name: strings bare, lists joined with `-`.
fn value_label(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Array(items) => items.iter().map(value_label).collect::<Vec<_>>().join("-"),
        other => other.to_string(),
    }
}

/// A float to 3 significant digits for a name: `0.00316`, `0.25`, `123`, `3.16e-5`.
fn short_number(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return value.to_string();
    }
    let exponent = value.abs().log10().floor() as i32;
    let trim = |text: String| {
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            text
        }
    };
    if (-4..=4).contains(&exponent) {
        trim(format!("{:.*}", (2 - exponent).max(0) as usize, value))
    } else {
        let scientific = format!("{value:.2e}");
        let (mantissa, power) = scientific.split_once('e').unwrap_or((&scientific, "0"));
        format!("{}e{power}", trim(mantissa.to_owned()))
    }
}

fn configuration_id(values: &[(String, String)]) -> String {
    if values.is_empty() {
        return "default".into();
    }
    values
        .iter()
        .map(|(name, label)| format!("{name}={}", filesystem_safe(label)))
        .collect::<Vec<_>>()
        .join("_")
}

/// Every combination of the grid's values (the first parameter varies slowest), named `a=1_b=x`.
pub fn grid_configurations(grid: &[(String, Vec<Value>)]) -> Vec<Configuration> {
    let mut combinations: Vec<Vec<(String, Value)>> = vec![Vec::new()];
    for (name, values) in grid {
        combinations = combinations
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |value| {
                    let mut next = prefix.clone();
                    next.push((name.clone(), value.clone()));
                    next
                })
            })
            .collect();
    }
    combinations
        .into_iter()
        .map(|values| {
            let labels: Vec<(String, String)> = values
                .iter()
                .map(|(name, value)| (name.clone(), value_label(value)))
                .collect();
            Configuration {
                id: configuration_id(&labels),
                values,
            }
        })
        .collect()
}

/// One dimension of a random search.
#[derive(Clone, Debug, PartialEq)]
pub enum Distribution {
    Uniform(f64, f64),
    LogUniform(f64, f64),
    /// Integers from the first to the second, both included.
    IntUniform(i64, i64),
    Choice(Vec<Value>),
}

impl Distribution {
    /// `{"uniform": [a, b]}`, `{"log_uniform": [a, b]}`, `{"int_uniform": [a, b]}`, `{"choice": [...]}`, or a
    /// bare list (a choice).
    pub fn parse(name: &str, spec: &Value) -> Result<Self> {
        let context = || format!("random.space.{name}");
        if let Value::Array(items) = spec {
            return Self::choice(items).with_context(context);
        }
        let Some((kind, arguments)) = spec
            .as_object()
            .filter(|o| o.len() == 1)
            .and_then(|o| o.iter().next())
        else {
            bail!("{}: expected {{\"uniform\" | \"log_uniform\" | \"int_uniform\" | \"choice\": [...]}} or a list, got {spec}", context());
        };
        let bounds = || -> Result<(f64, f64)> {
            match arguments.as_array().map(Vec::as_slice) {
                Some([low, high]) => match (low.as_f64(), high.as_f64()) {
                    (Some(low), Some(high)) if low < high => Ok((low, high)),
                    _ => bail!(
                        "{}: `{kind}` needs [low, high] numbers with low < high, got {arguments}",
                        context()
                    ),
                },
                _ => bail!("{}: `{kind}` needs [low, high], got {arguments}", context()),
            }
        };
        match kind.as_str() {
            "uniform" => {
                let (low, high) = bounds()?;
                Ok(Self::Uniform(low, high))
            }
            "log_uniform" => {
                let (low, high) = bounds()?;
                if low <= 0.0 {
                    bail!("{}: `log_uniform` needs positive bounds", context());
                }
                Ok(Self::LogUniform(low, high))
            }
            "int_uniform" => match arguments.as_array().map(Vec::as_slice) {
                Some([low, high]) => match (low.as_i64(), high.as_i64()) {
                    (Some(low), Some(high)) if low <= high => Ok(Self::IntUniform(low, high)),
                    _ => bail!("{}: `int_uniform` needs [low, high] integers with low <= high, got {arguments}", context()),
                },
                _ => bail!("{}: `int_uniform` needs [low, high], got {arguments}", context()),
            },
            "choice" => match arguments {
                Value::Array(items) => Self::choice(items).with_context(context),
                _ => bail!("{}: `choice` needs a list, got {arguments}", context()),
            },
            other => bail!("{}: unknown distribution `{other}` (known: uniform, log_uniform, int_uniform, choice)", context()),
        }
    }

    fn choice(items: &[Value]) -> Result<Self> {
        if items.is_empty() {
            bail!("a choice needs at least one value");
        }
        Ok(Self::Choice(items.to_vec()))
    }

    fn sample(&self, rng: &mut impl Rng) -> Value {
        match self {
            Self::Uniform(low, high) => Value::from(low + (high - low) * rng.random::<f64>()),
            Self::LogUniform(low, high) => {
                let (low, high) = (low.ln(), high.ln());
                Value::from((low + (high - low) * rng.random::<f64>()).exp())
            }
            Self::IntUniform(low, high) => Value::from(rng.random_range(*low..=*high)),
            Self::Choice(items) => items[rng.random_range(0..items.len())].clone(),
        }
    }
}

/// `n` configurations drawn from `space` with a generator seeded by `seed`, named `07_lr=0.00316_depth=3`
/// (floats to 3 significant digits; the index keeps names unique, the values passed are the exact draws).
pub fn random_configurations(
    space: &[(String, Distribution)],
    n: usize,
    seed: u64,
) -> Vec<Configuration> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let width = n.saturating_sub(1).to_string().len().max(2);
    (0..n)
        .map(|index| {
            let values: Vec<(String, Value)> = space
                .iter()
                .map(|(name, distribution)| (name.clone(), distribution.sample(&mut rng)))
                .collect();
            let labels: Vec<(String, String)> = values
                .iter()
                .map(|(name, value)| {
                    let label = match value {
                        Value::Number(number) if number.is_f64() => {
                            short_number(number.as_f64().unwrap_or(f64::NAN))
                        }
                        other => value_label(other),
                    };
                    (name.clone(), label)
                })
                .collect();
            Configuration {
                id: format!("{index:0width$}_{}", configuration_id(&labels)),
                values,
            }
        })
        .collect()
}

impl Sweep {
    /// Reads and checks a sweep file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: SweepFile =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let path = std::path::absolute(path)?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        Self::from_file(file, base_dir).with_context(|| format!("in {}", path.display()))
    }

    fn from_file(file: SweepFile, base_dir: PathBuf) -> Result<Self> {
        let (swept, configurations) = match (&file.grid, &file.random) {
            (Some(_), Some(_)) => bail!("give either `grid` or `random`, not both"),
            (Some(grid), None) => {
                let mut axes = Vec::new();
                for (name, values) in &grid.0 {
                    check_param_name(name).context("grid")?;
                    match values {
                        Value::Array(items) if !items.is_empty() => {
                            axes.push((name.clone(), items.clone()))
                        }
                        _ => bail!("grid.{name} must be a non-empty list of values, got {values}"),
                    }
                }
                let names = axes.iter().map(|(name, _)| name.clone()).collect();
                (names, grid_configurations(&axes))
            }
            (None, Some(random)) => {
                if random.n == 0 {
                    bail!("random.n must be at least 1");
                }
                let mut space = Vec::new();
                for (name, spec) in &random.space.0 {
                    check_param_name(name).context("random.space")?;
                    space.push((name.clone(), Distribution::parse(name, spec)?));
                }
                let names = space.iter().map(|(name, _)| name.clone()).collect();
                (names, random_configurations(&space, random.n, random.seed))
            }
            (None, None) => (Vec::new(), grid_configurations(&[])),
        };
        for name in swept
            .iter()
            .chain(file.params.0.iter().map(|(name, _)| name))
        {
            check_param_name(name)?;
            if RESERVED.contains(&name.as_str()) {
                bail!("`{name}` is set by the sweep for every run (use `seeds` for the seed)");
            }
        }
        if let Some((name, _)) = file.params.0.iter().find(|(name, _)| swept.contains(name)) {
            bail!("`{name}` is both swept and fixed in `params`");
        }
        let mut ids = BTreeSet::new();
        for configuration in &configurations {
            if !ids.insert(configuration.id.as_str()) {
                bail!(
                    "two configurations get the folder name `{}`: make the values distinct",
                    configuration.id
                );
            }
        }
        let seeds = file.seeds.unwrap_or_else(|| vec![0]);
        if seeds.is_empty() {
            bail!("`seeds` must not be empty");
        }
        if seeds.iter().collect::<BTreeSet<_>>().len() != seeds.len() {
            bail!("`seeds` has a repeated seed");
        }
        if file.parallel == 0 {
            bail!("`parallel` must be at least 1");
        }
        let resolve = |path: &Path| base_dir.join(path);
        Ok(Self {
            script: resolve(&file.script),
            out: resolve(&file.out),
            args: file.args,
            fixed: file.params.0,
            swept,
            configurations,
            seeds,
            parallel: file.parallel,
            devices: file.devices,
            base_dir,
        })
    }

    /// Every run: configurations in order, each with every seed.
    pub fn runs(&self) -> Vec<RunSpec> {
        self.configurations
            .iter()
            .enumerate()
            .flat_map(|(index, configuration)| {
                self.seeds.iter().map(move |&seed| RunSpec {
                    configuration: index,
                    seed,
                    dir: self
                        .out
                        .join(&configuration.id)
                        .join(format!("seed-{seed}")),
                })
            })
            .collect()
    }

    /// `PARAMS` of a run: the fixed parameters, the configuration's values, `seed` and `out`.
    pub fn run_params(&self, run: &RunSpec) -> Vec<(String, Value)> {
        let mut params = self.fixed.clone();
        params.extend(
            self.configurations[run.configuration]
                .values
                .iter()
                .cloned(),
        );
        params.push(("seed".into(), Value::from(run.seed)));
        params.push((
            "out".into(),
            Value::String(run.dir.to_string_lossy().into_owned()),
        ));
        params
    }

    /// Arguments of the child `ivado` for a run: global flags, then `run --param ... <script> <args>`.
    pub fn child_args(&self, run: &RunSpec, flags: &ChildFlags, device: &str) -> Vec<String> {
        let mut args = vec!["--no-progress".to_owned(), "--device".into(), device.into()];
        for dir in &flags.plugin_dirs {
            args.push("--plugin-dir".into());
            args.push(dir.to_string_lossy().into_owned());
        }
        args.push("run".into());
        for (name, value) in self.run_params(run) {
            args.push("--param".into());
            args.push(format!("{name}={}", format_param_value(&value)));
        }
        args.push(self.script.to_string_lossy().into_owned());
        args.extend(self.args.iter().cloned());
        args
    }

    /// `--device` of parallel slot `slot`: the sweep file's `devices` in turn (one GPU per slot, as
    /// ivadomed's `gpu` list), else the sweep's own.
    pub fn slot_device<'a>(&'a self, slot: usize, flags: &'a ChildFlags) -> &'a str {
        if self.devices.is_empty() {
            &flags.device
        } else {
            &self.devices[slot % self.devices.len()]
        }
    }

    fn run_name(&self, run: &RunSpec) -> String {
        format!(
            "{}/seed-{}",
            self.configurations[run.configuration].id, run.seed
        )
    }
}

/// Global flags the sweep passes on to its child processes.
#[derive(Clone, Debug, Default)]
pub struct ChildFlags {
    /// `--device` of the sweep itself, used when the sweep file lists no `devices`.
    pub device: String,
    /// `--plugin-dir`s, made absolute since the children start in the sweep file's folder.
    pub plugin_dirs: Vec<PathBuf>,
}

// ---------------------------------------------------------------------------------------------------------
// Running.

#[derive(Clone, Debug, PartialEq)]
pub enum RunStatus {
    /// Complete: `done.json` and `metrics.csv` are there.
    Done,
    /// Ran in this invocation and failed.
    Failed { message: String },
    /// Not run (yet): `--collect` before the runs finished, or never started.
    Missing,
}

/// Last `count` lines of a file (empty when unreadable).
fn tail_lines(path: &Path, count: usize) -> Vec<String> {
    let text = std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..]
        .iter()
        .map(|line| line.to_string())
        .collect()
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "unknown exit status".into(),
    }
}

/// Runs one child to completion; `Ok` with the seconds it took, `Err` with why it failed.
fn execute_run(
    sweep: &Sweep,
    run: &RunSpec,
    flags: &ChildFlags,
    device: &str,
    executable: &Path,
) -> std::result::Result<f64, String> {
    let start = Instant::now();
    let args = sweep.child_args(run, flags, device);
    let log_path = run.dir.join(LOG_FILE);
    let spawned = (|| -> Result<std::process::Child> {
        std::fs::create_dir_all(&run.dir)
            .with_context(|| format!("creating {}", run.dir.display()))?;
        // A stale marker from an earlier, different attempt must not outlive this one.
        let _ = std::fs::remove_file(run.dir.join(DONE_FILE));
        let mut log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        writeln!(log, "# {}", shell_command(executable, &args))?;
        let stderr = log.try_clone()?;
        Command::new(executable)
            .args(&args)
            .current_dir(&sweep.base_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", executable.display()))
    })();
    let status = spawned
        .and_then(|mut child| Ok(child.wait()?))
        .map_err(|error| format!("{error:#}"))?;
    let seconds = start.elapsed().as_secs_f64();
    if !status.success() {
        return Err(describe_exit(status));
    }
    if !run.dir.join(METRICS_FILE).is_file() {
        return Err(format!(
            "exited 0 but wrote no {METRICS_FILE} in PARAMS.out"
        ));
    }
    let params: serde_json::Map<String, Value> = sweep.run_params(run).into_iter().collect();
    let done = json!({
        "exit_code": 0,
        "seconds": seconds,
        "params": params,
        "command": std::iter::once(executable.to_string_lossy().into_owned()).chain(args).collect::<Vec<_>>(),
    });
    crate::model_folder::write_atomic(
        &run.dir.join(DONE_FILE),
        serde_json::to_string_pretty(&done)
            .unwrap_or_default()
            .as_bytes(),
    )
    .map_err(|error| format!("{error:#}"))?;
    Ok(seconds)
}

/// Runs every incomplete run, `sweep.parallel` at a time, reporting each as it ends; returns every run's
/// status (complete ones skipped).
pub fn execute(sweep: &Sweep, flags: &ChildFlags) -> Result<Vec<(RunSpec, RunStatus)>> {
    let executable = std::env::current_exe().context("locating the ivado executable")?;
    let runs = sweep.runs();
    let pending: Vec<usize> = (0..runs.len())
        .filter(|&i| !runs[i].is_complete())
        .collect();
    println!(
        "sweep: {} runs ({} configurations x {} seeds) in {}",
        runs.len(),
        sweep.configurations.len(),
        sweep.seeds.len(),
        sweep.out.display()
    );
    if pending.len() < runs.len() {
        println!(
            "{} already complete ({DONE_FILE} present), skipped",
            runs.len() - pending.len()
        );
    }
    if !pending.is_empty() {
        println!(
            "running {} ({} in parallel)",
            pending.len(),
            sweep.parallel.min(pending.len())
        );
    }
    let statuses: Mutex<Vec<RunStatus>> = Mutex::new(vec![RunStatus::Done; runs.len()]);
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let workers = sweep.parallel.min(pending.len());
    std::thread::scope(|scope| {
        for slot in 0..workers {
            let device = sweep.slot_device(slot, flags).to_owned();
            let (runs, pending, statuses, next, finished, executable) =
                (&runs, &pending, &statuses, &next, &finished, &executable);
            scope.spawn(move || {
                while let Some(&index) = pending.get(next.fetch_add(1, Ordering::SeqCst)) {
                    let run = &runs[index];
                    let outcome = execute_run(sweep, run, flags, &device, executable);
                    let count = finished.fetch_add(1, Ordering::SeqCst) + 1;
                    let name = sweep.run_name(run);
                    // One print per run so parallel reports do not interleave.
                    let report = match &outcome {
                        Ok(seconds) => {
                            format!("[{count}/{}] {name}: done in {seconds:.1} s", pending.len())
                        }
                        Err(message) => {
                            let mut report = format!(
                                "[{count}/{}] {name}: FAILED ({message}); last lines of {}:",
                                pending.len(),
                                run.dir.join(LOG_FILE).display()
                            );
                            for line in tail_lines(&run.dir.join(LOG_FILE), FAILURE_TAIL_LINES) {
                                let _ = write!(report, "\n    {line}");
                            }
                            report
                        }
                    };
                    println!("{report}");
                    let status = match outcome {
                        Ok(_) => RunStatus::Done,
                        Err(message) => RunStatus::Failed { message },
                    };
                    statuses.lock().unwrap_or_else(|e| e.into_inner())[index] = status;
                }
            });
        }
    });
    let statuses = statuses.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(runs.into_iter().zip(statuses).collect())
}

// ---------------------------------------------------------------------------------------------------------
// Slurm.

/// Quotes a word for POSIX shells when it needs it.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-+=./:,@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn shell_command(executable: &Path, args: &[String]) -> String {
    std::iter::once(shell_quote(&executable.to_string_lossy()))
        .chain(args.iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What `--slurm` wrote.
#[derive(Debug)]
pub struct SlurmFiles {
    pub jobs: PathBuf,
    pub job_dirs: PathBuf,
    pub sbatch: PathBuf,
    pub pending: usize,
}

/// Writes `jobs.txt` (one `ivado run` command line per incomplete run), `job_dirs.txt` (its run folder, same
/// line) and `sweep.sbatch` (a job array over those lines, `parallel` at a time). `None` when every run is
/// already complete.
pub fn write_slurm(sweep: &Sweep, flags: &ChildFlags) -> Result<Option<SlurmFiles>> {
    let executable = std::env::current_exe().context("locating the ivado executable")?;
    let pending: Vec<RunSpec> = sweep
        .runs()
        .into_iter()
        .filter(|run| !run.is_complete())
        .collect();
    if pending.is_empty() {
        return Ok(None);
    }
    // Slurm gives each task its own allocation, so every task uses the first device.
    let device = sweep.slot_device(0, flags);
    let mut jobs = String::new();
    let mut job_dirs = String::new();
    for run in &pending {
        jobs.push_str(&shell_command(
            &executable,
            &sweep.child_args(run, flags, device),
        ));
        jobs.push('\n');
        let dir = run.dir.to_string_lossy();
        if dir.contains('\n') {
            bail!("run folder {dir:?} contains a line break");
        }
        job_dirs.push_str(&dir);
        job_dirs.push('\n');
    }
    let files = SlurmFiles {
        jobs: sweep.out.join("jobs.txt"),
        job_dirs: sweep.out.join("job_dirs.txt"),
        sbatch: sweep.out.join("sweep.sbatch"),
        pending: pending.len(),
    };
    let quoted = |path: &Path| shell_quote(&path.to_string_lossy());
    let sbatch = format!(
        r#"#!/bin/bash
#SBATCH --job-name=ivado-sweep
#SBATCH --array=0-{last}%{parallel}
#SBATCH --output={out}/slurm-%A_%a.out
# Written by `ivado sweep --slurm`: task i runs line i + 1 of jobs.txt, then marks its run folder complete
# ({done}) when it exited 0 and wrote {metrics}, so `ivado sweep --collect` (or a re-run) counts it.
set -euo pipefail
cd {base}
line=$((SLURM_ARRAY_TASK_ID + 1))
command=$(sed -n "${{line}}p" {jobs})
run_dir=$(sed -n "${{line}}p" {job_dirs})
mkdir -p "$run_dir"
rm -f "$run_dir/{done}"
start=$(date +%s)
eval "$command"
test -f "$run_dir/{metrics}" || {{ echo "no {metrics} in $run_dir" >&2; exit 1; }}
printf '{{"exit_code": 0, "seconds": %s, "slurm_job": "%s_%s"}}\n' "$(( $(date +%s) - start ))" \
    "${{SLURM_ARRAY_JOB_ID:-}}" "$SLURM_ARRAY_TASK_ID" > "$run_dir/{done}"
"#,
        last = pending.len() - 1,
        parallel = sweep.parallel,
        out = sweep.out.display(),
        base = quoted(&sweep.base_dir),
        jobs = quoted(&files.jobs),
        job_dirs = quoted(&files.job_dirs),
        done = DONE_FILE,
        metrics = METRICS_FILE,
    );
    std::fs::create_dir_all(&sweep.out)
        .with_context(|| format!("creating {}", sweep.out.display()))?;
    crate::model_folder::write_atomic(&files.jobs, jobs.as_bytes())?;
    crate::model_folder::write_atomic(&files.job_dirs, job_dirs.as_bytes())?;
    crate::model_folder::write_atomic(&files.sbatch, sbatch.as_bytes())?;
    Ok(Some(files))
}

// ---------------------------------------------------------------------------------------------------------
// Aggregation.

/// Reads a CSV file with a header (RFC 4180 quoting) into rows keyed by column name.
pub fn read_csv(path: &Path) -> Result<Vec<BTreeMap<String, String>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut records: Vec<Vec<String>> = Vec::new();
    let mut record: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    records.retain(|r| !(r.len() == 1 && r[0].is_empty()));
    let mut records = records.into_iter();
    let header = records
        .next()
        .ok_or_else(|| anyhow!("{} is empty", path.display()))?;
    records
        .enumerate()
        .map(|(index, row)| {
            if row.len() != header.len() {
                bail!(
                    "{} line {}: {} fields, the header has {}",
                    path.display(),
                    index + 2,
                    row.len(),
                    header.len()
                );
            }
            Ok(header.iter().cloned().zip(row).collect())
        })
        .collect()
}

fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn csv_number(value: f64) -> String {
    if value.is_nan() {
        String::new()
    } else {
        value.to_string()
    }
}

fn csv_value(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn number_cell(row: &BTreeMap<String, String>, column: &str) -> f64 {
    row.get(column)
        .and_then(|cell| cell.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

/// The best epoch of a `metrics.csv`: its `epoch` and `valid_dice` (the first of equal maxima).
pub fn best_validation(path: &Path) -> Result<(Option<i64>, f64)> {
    let rows = read_csv(path)?;
    if rows
        .first()
        .is_some_and(|row| !row.contains_key("valid_dice"))
    {
        bail!("{} has no `valid_dice` column", path.display());
    }
    let mut best: Option<(Option<i64>, f64)> = None;
    for row in &rows {
        let dice = number_cell(row, "valid_dice");
        if dice.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, best_dice)| dice > best_dice) {
            let epoch = row.get("epoch").and_then(|e| e.trim().parse().ok());
            best = Some((epoch, dice));
        }
    }
    best.ok_or_else(|| anyhow!("{} has no valid_dice value", path.display()))
}

/// The Dice column of an evaluation table: `dice`, or the first class of a multi-class one.
fn dice_column(row: &BTreeMap<String, String>) -> Option<&'static str> {
    ["dice", "dice_class0"]
        .into_iter()
        .find(|column| row.contains_key(*column))
}

/// Per-image test Dice of an `evaluation.csv`, keyed by (subject, contrast); NaN Dice (empty prediction and
/// label) stays NaN.
pub fn image_dice(path: &Path) -> Result<ImageDice> {
    let rows = read_csv(path)?;
    let mut images = BTreeMap::new();
    for row in &rows {
        let column =
            dice_column(row).ok_or_else(|| anyhow!("{} has no `dice` column", path.display()))?;
        let subject = row
            .get("subject")
            .ok_or_else(|| anyhow!("{} has no `subject` column", path.display()))?;
        let contrast = row.get("contrast").cloned().unwrap_or_default();
        let key = (subject.clone(), contrast);
        if images
            .insert(key.clone(), number_cell(row, column))
            .is_some()
        {
            bail!(
                "{} has two rows for subject {} contrast {}",
                path.display(),
                key.0,
                key.1
            );
        }
    }
    Ok(images)
}

/// What a run contributes to the tables.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    pub run: RunSpec,
    pub status: String,
    pub best_epoch: Option<i64>,
    pub best_valid_dice: f64,
    /// Mean over the images of `evaluation.csv` with a Dice; NaN without one.
    pub test_dice: f64,
}

fn run_result(run: RunSpec, status: &RunStatus) -> RunResult {
    let mut result = RunResult {
        run,
        status: match status {
            RunStatus::Done => "done".into(),
            RunStatus::Failed { .. } => "failed".into(),
            RunStatus::Missing => "missing".into(),
        },
        best_epoch: None,
        best_valid_dice: f64::NAN,
        test_dice: f64::NAN,
    };
    if *status != RunStatus::Done {
        return result;
    }
    let read = (|| -> Result<()> {
        let (epoch, dice) = best_validation(&result.run.dir.join(METRICS_FILE))?;
        result.best_epoch = epoch;
        result.best_valid_dice = dice;
        let evaluation = result.run.dir.join(EVALUATION_FILE);
        if evaluation.is_file() {
            let dice: Vec<f64> = image_dice(&evaluation)?
                .into_values()
                .filter(|d| !d.is_nan())
                .collect();
            result.test_dice = stats::mean(&dice);
        }
        Ok(())
    })();
    if let Err(error) = read {
        eprintln!("warning: {error:#}");
        result.status = "invalid".into();
        result.best_epoch = None;
        result.best_valid_dice = f64::NAN;
        result.test_dice = f64::NAN;
    }
    result
}

/// One configuration's line of `summary.csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigurationSummary {
    pub configuration: usize,
    /// Runs with a validation Dice.
    pub n: usize,
    pub valid_dice_mean: f64,
    pub valid_dice_std: f64,
    /// Runs with a test Dice.
    pub test_n: usize,
    pub test_dice_mean: f64,
    pub test_dice_std: f64,
}

pub fn summarise(sweep: &Sweep, results: &[RunResult]) -> Vec<ConfigurationSummary> {
    (0..sweep.configurations.len())
        .map(|configuration| {
            let of = |metric: fn(&RunResult) -> f64| -> Vec<f64> {
                results
                    .iter()
                    .filter(|r| r.run.configuration == configuration)
                    .map(metric)
                    .filter(|v| !v.is_nan())
                    .collect()
            };
            let valid = of(|r| r.best_valid_dice);
            let test = of(|r| r.test_dice);
            ConfigurationSummary {
                configuration,
                n: valid.len(),
                valid_dice_mean: stats::mean(&valid),
                valid_dice_std: stats::sample_std(&valid),
                test_n: test.len(),
                test_dice_mean: stats::mean(&test),
                test_dice_std: stats::sample_std(&test),
            }
        })
        .collect()
}

fn csv_line(cells: Vec<String>) -> String {
    cells
        .iter()
        .map(|c| csv_cell(c))
        .collect::<Vec<_>>()
        .join(",")
        + "\n"
}

/// Reads every run folder and writes `sweep.csv` and `summary.csv`; returns the per-run results and
/// the summaries.
pub fn aggregate(
    sweep: &Sweep,
    statuses: &[(RunSpec, RunStatus)],
) -> Result<(Vec<RunResult>, Vec<ConfigurationSummary>)> {
    let results: Vec<RunResult> = statuses
        .iter()
        .map(|(run, status)| run_result(run.clone(), status))
        .collect();
    let summaries = summarise(sweep, &results);
    let swept_cells = |configuration: usize| -> Vec<String> {
        let values = &sweep.configurations[configuration].values;
        sweep
            .swept
            .iter()
            .map(|name| {
                values
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| csv_value(v))
                    .unwrap_or_default()
            })
            .collect()
    };
    let mut header = vec!["config".to_owned()];
    header.extend(sweep.swept.iter().cloned());
    let mut runs_csv = csv_line(
        header
            .iter()
            .cloned()
            .chain(
                [
                    "seed",
                    "status",
                    "best_epoch",
                    "best_valid_dice",
                    "test_dice",
                    "folder",
                ]
                .map(String::from),
            )
            .collect(),
    );
    for result in &results {
        let configuration = result.run.configuration;
        let mut cells = vec![sweep.configurations[configuration].id.clone()];
        cells.extend(swept_cells(configuration));
        cells.extend([
            result.run.seed.to_string(),
            result.status.clone(),
            result.best_epoch.map(|e| e.to_string()).unwrap_or_default(),
            csv_number(result.best_valid_dice),
            csv_number(result.test_dice),
            result
                .run
                .dir
                .strip_prefix(&sweep.out)
                .unwrap_or(&result.run.dir)
                .display()
                .to_string(),
        ]);
        runs_csv.push_str(&csv_line(cells));
    }
    let mut summary_csv = csv_line(
        header
            .iter()
            .cloned()
            .chain(
                [
                    "n",
                    "best_valid_dice_mean",
                    "best_valid_dice_std",
                    "test_n",
                    "test_dice_mean",
                    "test_dice_std",
                ]
                .map(String::from),
            )
            .collect(),
    );
    for summary in &summaries {
        let mut cells = vec![sweep.configurations[summary.configuration].id.clone()];
        cells.extend(swept_cells(summary.configuration));
        cells.extend([
            summary.n.to_string(),
            csv_number(summary.valid_dice_mean),
            csv_number(summary.valid_dice_std),
            summary.test_n.to_string(),
            csv_number(summary.test_dice_mean),
            csv_number(summary.test_dice_std),
        ]);
        summary_csv.push_str(&csv_line(cells));
    }
    crate::model_folder::write_atomic(&sweep.out.join("sweep.csv"), runs_csv.as_bytes())?;
    crate::model_folder::write_atomic(&sweep.out.join("summary.csv"), summary_csv.as_bytes())?;
    Ok((results, summaries))
}

fn mean_std(mean: f64, std: f64) -> String {
    match (mean.is_nan(), std.is_nan()) {
        (true, _) => "-".into(),
        (false, true) => format!("{mean:.4}"),
        (false, false) => format!("{mean:.4} ± {std:.4}"),
    }
}

/// The summary as a table, best mean validation Dice first (configurations without one last).
pub fn format_summary(sweep: &Sweep, summaries: &[ConfigurationSummary]) -> String {
    let mut order: Vec<&ConfigurationSummary> = summaries.iter().collect();
    order.sort_by(|a, b| {
        let key = |s: &ConfigurationSummary| {
            if s.valid_dice_mean.is_nan() {
                f64::NEG_INFINITY
            } else {
                s.valid_dice_mean
            }
        };
        key(b).total_cmp(&key(a))
    });
    let width = sweep
        .configurations
        .iter()
        .map(|c| c.id.len())
        .max()
        .unwrap_or(0)
        .max("configuration".len());
    let mut text = format!(
        "{:<width$}  {:>3}  {:<22}  {}\n",
        "configuration", "n", "best valid Dice", "test Dice"
    );
    for summary in order {
        let _ = writeln!(
            text,
            "{:<width$}  {:>3}  {:<22}  {}",
            sweep.configurations[summary.configuration].id,
            summary.n,
            mean_std(summary.valid_dice_mean, summary.valid_dice_std),
            mean_std(summary.test_dice_mean, summary.test_dice_std)
        );
    }
    text
}

// ---------------------------------------------------------------------------------------------------------
// The `ivado sweep` command.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepMode {
    /// Run the incomplete runs, then aggregate.
    Run,
    /// Write the Slurm job array for the incomplete runs.
    Slurm,
    /// Only aggregate the runs that are complete.
    Collect,
}

pub fn sweep_command(path: &Path, mode: SweepMode, flags: &ChildFlags) -> Result<()> {
    let sweep = Sweep::load(path)?;
    let flags = ChildFlags {
        device: flags.device.clone(),
        plugin_dirs: flags
            .plugin_dirs
            .iter()
            .map(std::path::absolute)
            .collect::<std::io::Result<_>>()?,
    };
    if mode != SweepMode::Collect && !sweep.script.is_file() {
        bail!("script {} not found", sweep.script.display());
    }
    let statuses = match mode {
        SweepMode::Slurm => {
            match write_slurm(&sweep, &flags)? {
                None => println!(
                    "all {} runs are complete: nothing to submit; `ivado sweep {} --collect` aggregates them",
                    sweep.runs().len(),
                    path.display()
                ),
                Some(files) => {
                    println!(
                        "wrote {} ({} of {} runs pending), {} and {}",
                        files.jobs.display(),
                        files.pending,
                        sweep.runs().len(),
                        files.job_dirs.display(),
                        files.sbatch.display()
                    );
                    println!("submit with: sbatch {}", files.sbatch.display());
                    println!(
                        "when the array has finished: ivado sweep {} --collect",
                        path.display()
                    );
                }
            }
            return Ok(());
        }
        SweepMode::Collect => sweep
            .runs()
            .into_iter()
            .map(|run| {
                let status = if run.is_complete() {
                    RunStatus::Done
                } else {
                    RunStatus::Missing
                };
                (run, status)
            })
            .collect(),
        SweepMode::Run => execute(&sweep, &flags)?,
    };
    let (results, summaries) = aggregate(&sweep, &statuses)?;
    let missing = results.iter().filter(|r| r.status == "missing").count();
    if missing > 0 {
        println!("{missing} of {} runs are not complete", results.len());
    }
    println!(
        "wrote {} and {}",
        sweep.out.join("sweep.csv").display(),
        sweep.out.join("summary.csv").display()
    );
    print!("{}", format_summary(&sweep, &summaries));
    let failed = results.iter().filter(|r| r.status == "failed").count();
    if failed > 0 {
        bail!("{failed} of {} runs failed (see above)", results.len());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Comparing two models.

/// Test Dice per image, keyed by (subject, contrast).
pub type ImageDice = BTreeMap<(String, String), f64>;

/// Per-image test Dice of a run folder (its `evaluation.csv`) or of a configuration folder (the mean over
/// its runs' `evaluation.csv`, per image); and the number of runs read.
pub fn folder_image_dice(folder: &Path) -> Result<(ImageDice, usize)> {
    let own = folder.join(EVALUATION_FILE);
    if own.is_file() {
        return Ok((image_dice(&own)?, 1));
    }
    let mut runs: Vec<PathBuf> = std::fs::read_dir(folder)
        .with_context(|| format!("reading {}", folder.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.join(EVALUATION_FILE).is_file())
        .collect();
    runs.sort();
    if runs.is_empty() {
        bail!(
            "{} has no {EVALUATION_FILE}, nor any sub-folder (seed run) with one",
            folder.display()
        );
    }
    let mut sums: BTreeMap<(String, String), (f64, usize)> = BTreeMap::new();
    for run in &runs {
        for (key, dice) in image_dice(&run.join(EVALUATION_FILE))? {
            let entry = sums.entry(key).or_insert((0.0, 0));
            if !dice.is_nan() {
                entry.0 += dice;
                entry.1 += 1;
            }
        }
    }
    let means = sums
        .into_iter()
        .map(|(key, (sum, count))| {
            let mean = if count == 0 {
                f64::NAN
            } else {
                sum / count as f64
            };
            (key, mean)
        })
        .collect();
    Ok((means, runs.len()))
}

#[derive(Clone, Debug)]
pub struct Comparison {
    pub runs: (usize, usize),
    /// Images paired (in both, with a Dice in both).
    pub n: usize,
    pub only_a: usize,
    pub only_b: usize,
    /// Images in both but without a Dice in one of them.
    pub without_dice: usize,
    pub mean_a: f64,
    pub mean_b: f64,
    /// Mean of B - A.
    pub mean_difference: f64,
    pub wilcoxon: Wilcoxon,
    pub t_test: PairedT,
}

/// Paired comparison of B against A on the images both were tested on.
pub fn compare(a: &Path, b: &Path) -> Result<Comparison> {
    let (dice_a, runs_a) = folder_image_dice(a)?;
    let (dice_b, runs_b) = folder_image_dice(b)?;
    let mut pairs = Vec::new();
    let mut without_dice = 0;
    for (key, &value_a) in &dice_a {
        if let Some(&value_b) = dice_b.get(key) {
            if value_a.is_nan() || value_b.is_nan() {
                without_dice += 1;
            } else {
                pairs.push((value_a, value_b));
            }
        }
    }
    let both = pairs.len() + without_dice;
    if pairs.len() < 2 {
        bail!(
            "only {} images have a test Dice in both {} and {}: a paired test needs at least 2",
            pairs.len(),
            a.display(),
            b.display()
        );
    }
    let differences: Vec<f64> = pairs.iter().map(|(a, b)| b - a).collect();
    let a_values: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let b_values: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    Ok(Comparison {
        runs: (runs_a, runs_b),
        n: pairs.len(),
        only_a: dice_a.len() - both,
        only_b: dice_b.len() - both,
        without_dice,
        mean_a: stats::mean(&a_values),
        mean_b: stats::mean(&b_values),
        mean_difference: stats::mean(&differences),
        wilcoxon: stats::wilcoxon_signed_rank(&differences),
        t_test: stats::paired_t_test(&differences),
    })
}

fn p_value(p: f64) -> String {
    if p.is_nan() {
        "n/a".into()
    } else if p == 0.0 {
        "0".into()
    } else if p < 1e-4 {
        format!("{p:.3e}")
    } else {
        format!("{p:.6}")
    }
}

pub fn format_comparison(a: &Path, b: &Path, comparison: &Comparison) -> String {
    let c = comparison;
    let w = &c.wilcoxon;
    let method = match w.method {
        WilcoxonMethod::Exact => "exact",
        WilcoxonMethod::Normal if w.ties => "normal approximation, tie and continuity corrected",
        WilcoxonMethod::Normal => "normal approximation, continuity corrected",
    };
    format!(
        "A: {} ({} run{})\nB: {} ({} run{})\n\
         paired images: {} (only in A: {}, only in B: {}, without a Dice: {})\n\
         mean test Dice: A {:.6}, B {:.6}\n\
         mean difference (B - A): {:+.6}\n\
         Wilcoxon signed-rank: W = {}, p = {} ({method}; {} non-zero differences)\n\
         paired t-test: t = {:.6}, df = {}, p = {}\n",
        a.display(),
        c.runs.0,
        if c.runs.0 == 1 { "" } else { "s" },
        b.display(),
        c.runs.1,
        if c.runs.1 == 1 { "" } else { "s" },
        c.n,
        c.only_a,
        c.only_b,
        c.without_dice,
        c.mean_a,
        c.mean_b,
        c.mean_difference,
        w.statistic,
        p_value(w.p_value),
        w.n,
        c.t_test.statistic,
        c.t_test.df,
        p_value(c.t_test.p_value),
    )
}

pub fn compare_command(a: &Path, b: &Path) -> Result<()> {
    let comparison = compare(a, b)?;
    print!("{}", format_comparison(a, b, &comparison));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(axes: &[(&str, Value)]) -> Vec<(String, Vec<Value>)> {
        axes.iter()
            .map(|(name, values)| (name.to_string(), values.as_array().unwrap().clone()))
            .collect()
    }

    #[test]
    fn grid_expands_every_combination_with_readable_names() {
        let configurations = grid_configurations(&grid(&[
            ("lr", json!([0.001, 0.01])),
            ("depth", json!([2, 3, 4])),
            ("loss", json!(["dice", "focal/dice"])),
        ]));
        assert_eq!(configurations.len(), 2 * 3 * 2);
        assert_eq!(configurations[0].id, "lr=0.001_depth=2_loss=dice");
        // The last parameter varies fastest; `/` must not make a sub-folder.
        assert_eq!(configurations[1].id, "lr=0.001_depth=2_loss=focal-dice");
        assert_eq!(configurations[11].id, "lr=0.01_depth=4_loss=focal-dice");
        assert_eq!(
            configurations[11].values,
            vec![
                ("lr".to_string(), json!(0.01)),
                ("depth".to_string(), json!(4)),
                ("loss".to_string(), json!("focal/dice")),
            ]
        );
        let ids: BTreeSet<&str> = configurations.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), 12);
        // No parameters: a single configuration.
        let single = grid_configurations(&[]);
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].id, "default");
        assert!(single[0].values.is_empty());
    }

    #[test]
    fn grid_names_of_lists_and_exponents_are_filesystem_safe() {
        let configurations = grid_configurations(&grid(&[
            ("sizes", json!([[64, 64], [128, 128]])),
            ("lr", json!([1e-10])),
        ]));
        assert_eq!(configurations[0].id, "sizes=64-64_lr=1e-10");
        assert_eq!(configurations[1].id, "sizes=128-128_lr=1e-10");
    }

    #[test]
    fn random_search_is_deterministic_for_a_seed_and_within_bounds() {
        let space = vec![
            ("lr".to_string(), Distribution::LogUniform(1e-4, 1e-2)),
            ("dropout".to_string(), Distribution::Uniform(0.1, 0.5)),
            ("depth".to_string(), Distribution::IntUniform(2, 4)),
            (
                "loss".to_string(),
                Distribution::Choice(vec![json!("dice"), json!("focal")]),
            ),
        ];
        let first = random_configurations(&space, 200, 7);
        assert_eq!(first, random_configurations(&space, 200, 7));
        assert_ne!(first, random_configurations(&space, 200, 8));
        let mut depths = BTreeSet::new();
        let mut losses = BTreeSet::new();
        let mut small_lr = 0;
        for configuration in &first {
            let value = |name: &str| {
                &configuration
                    .values
                    .iter()
                    .find(|(n, _)| n == name)
                    .unwrap()
                    .1
            };
            let lr = value("lr").as_f64().unwrap();
            assert!((1e-4..=1e-2).contains(&lr), "{lr}");
            small_lr += (lr < 1e-3) as usize;
            let dropout = value("dropout").as_f64().unwrap();
            assert!((0.1..=0.5).contains(&dropout), "{dropout}");
            depths.insert(value("depth").as_i64().unwrap());
            losses.insert(value("loss").as_str().unwrap().to_owned());
        }
        // Every integer and choice is drawn; log-uniform puts half the mass below the geometric middle
        // 1e-3 (binomial(200, 0.5): 70..130 holds with probability > 0.9999).
        assert_eq!(depths, BTreeSet::from([2, 3, 4]));
        assert_eq!(losses.len(), 2);
        assert!((70..=130).contains(&small_lr), "{small_lr}");
        // Names: zero-padded index, floats to 3 significant digits.
        assert!(first[0].id.starts_with("000_lr="), "{}", first[0].id);
        assert!(first[199].id.starts_with("199_lr="), "{}", first[199].id);
        let ids: BTreeSet<&str> = first.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), 200);
    }

    #[test]
    fn distributions_parse_from_json_and_reject_bad_bounds() {
        assert_eq!(
            Distribution::parse("lr", &json!({"log_uniform": [1e-4, 1e-2]})).unwrap(),
            Distribution::LogUniform(1e-4, 1e-2)
        );
        assert_eq!(
            Distribution::parse("d", &json!([2, 3])).unwrap(),
            Distribution::Choice(vec![json!(2), json!(3)])
        );
        assert_eq!(
            Distribution::parse("d", &json!({"int_uniform": [2, 5]})).unwrap(),
            Distribution::IntUniform(2, 5)
        );
        for bad in [
            json!({"uniform": [0.5, 0.1]}),
            json!({"log_uniform": [0, 1]}),
            json!({"normal": [0, 1]}),
            json!({"choice": []}),
            json!(0.3),
        ] {
            assert!(Distribution::parse("x", &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn short_numbers_keep_three_significant_digits() {
        assert_eq!(short_number(0.0031622776), "0.00316");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(123.456), "123");
        assert_eq!(short_number(3.16e-5), "3.16e-5");
        assert_eq!(short_number(-1.5), "-1.5");
    }

    #[test]
    fn param_values_parse_by_type_and_round_trip() {
        assert_eq!(parse_param_value("3").unwrap(), json!(3));
        assert_eq!(parse_param_value("-2").unwrap(), json!(-2));
        assert_eq!(parse_param_value("0.01").unwrap(), json!(0.01));
        assert_eq!(parse_param_value("1e-4").unwrap(), json!(1e-4));
        assert_eq!(parse_param_value("true").unwrap(), json!(true));
        assert_eq!(parse_param_value("adam").unwrap(), json!("adam"));
        assert_eq!(parse_param_value("nan").unwrap(), json!("nan"));
        assert_eq!(parse_param_value("[64, 64]").unwrap(), json!([64, 64]));
        assert_eq!(parse_param_value("\"3\"").unwrap(), json!("3"));
        assert!(parse_param_value("[1, 2").is_err());
        for value in [
            json!(3),
            json!(0.001),
            json!(1e-10),
            json!("adam"),
            json!("3"),
            json!("true"),
            json!("a b"),
            json!([1, "x"]),
            json!({"k": 1}),
            json!(false),
        ] {
            assert_eq!(
                parse_param_value(&format_param_value(&value)).unwrap(),
                value
            );
        }
        assert_eq!(parse_param("lr=0.5").unwrap(), ("lr".into(), json!(0.5)));
        assert_eq!(parse_param("eq=a=b").unwrap(), ("eq".into(), json!("a=b")));
        assert!(parse_param("lr").is_err());
        assert!(parse_param("2x=1").is_err());
        assert!(parse_params(&["a=1".into(), "a=2".into()]).is_err());
    }

    fn sweep_from(text: &str) -> Result<Sweep> {
        let file: SweepFile = serde_json::from_str(text)?;
        Sweep::from_file(file, PathBuf::from("/experiments"))
    }

    #[test]
    fn sweep_file_keeps_key_order_and_resolves_paths() {
        let sweep = sweep_from(
            r#"{"script": "train.rhai", "out": "runs/s", "grid": {"lr": [0.001, 0.01], "depth": [2, 3]},
                "params": {"epochs": 2}, "seeds": [1, 2], "parallel": 2}"#,
        )
        .unwrap();
        assert_eq!(sweep.swept, vec!["lr", "depth"]);
        assert_eq!(sweep.script, PathBuf::from("/experiments/train.rhai"));
        let runs = sweep.runs();
        assert_eq!(runs.len(), 8);
        assert_eq!(
            runs[1].dir,
            PathBuf::from("/experiments/runs/s/lr=0.001_depth=2/seed-2")
        );
        let flags = ChildFlags {
            device: "auto".into(),
            plugin_dirs: vec![],
        };
        assert_eq!(sweep.slot_device(1, &flags), "auto");
        let with_devices = sweep_from(
            r#"{"script": "t.rhai", "out": "o", "parallel": 3, "devices": ["cuda:0", "cuda:1"]}"#,
        )
        .unwrap();
        let slots: Vec<&str> = (0..3)
            .map(|slot| with_devices.slot_device(slot, &flags))
            .collect();
        assert_eq!(slots, ["cuda:0", "cuda:1", "cuda:0"]);
        let args = sweep.child_args(&runs[1], &ChildFlags::default(), "cpu");
        assert_eq!(
            args,
            [
                "--no-progress",
                "--device",
                "cpu",
                "run",
                "--param",
                "epochs=2",
                "--param",
                "lr=0.001",
                "--param",
                "depth=2",
                "--param",
                "seed=2",
                "--param",
                "out=/experiments/runs/s/lr=0.001_depth=2/seed-2",
                "/experiments/train.rhai",
            ]
        );
    }

    #[test]
    fn sweep_file_errors_name_the_problem() {
        let base = r#""script": "t.rhai", "out": "o""#;
        for (extra, message) in [
            (
                r#""grid": {"lr": [1]}, "random": {"n": 1, "space": {}}"#,
                "not both",
            ),
            (r#""grid": {"seed": [1, 2]}"#, "set by the sweep"),
            (r#""grid": {"lr": []}"#, "non-empty list"),
            (r#""grid": {"lr": [1]}, "params": {"lr": 2}"#, "both swept"),
            (r#""grid": {"a": ["x/y", "x-y"]}"#, "folder name `a=x-y`"),
            (r#""seeds": [1, 1]"#, "repeated seed"),
            (r#""parallel": 0"#, "at least 1"),
        ] {
            let error = sweep_from(&format!("{{{base}, {extra}}}")).unwrap_err();
            assert!(format!("{error:#}").contains(message), "{extra}: {error:#}");
        }
        assert!(sweep_from(&format!("{{{base}, \"gird\": {{}}}}")).is_err());
    }

    #[test]
    fn csv_reading_handles_quotes_and_best_epoch_is_the_maximum() {
        let dir = std::env::temp_dir().join(format!("ivado-sweep-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let metrics = dir.join("metrics.csv");
        std::fs::write(
            &metrics,
            "epoch,valid_loss,valid_dice\n1,0.5,0.25\n2,0.4,0.75\n3,0.3,NaN\n4,0.35,0.75\n",
        )
        .unwrap();
        assert_eq!(best_validation(&metrics).unwrap(), (Some(2), 0.75));
        let evaluation = dir.join("evaluation.csv");
        std::fs::write(
            &evaluation,
            "subject,contrast,dice,note\nsub-01,T2w,0.5,\"a, \"\"quoted\"\" note\"\nsub-02,T2w,NaN,x\n",
        )
        .unwrap();
        let images = image_dice(&evaluation).unwrap();
        assert_eq!(images[&("sub-01".into(), "T2w".into())], 0.5);
        assert!(images[&("sub-02".into(), "T2w".into())].is_nan());
        let rows = read_csv(&evaluation).unwrap();
        assert_eq!(rows[0]["note"], "a, \"quoted\" note");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shell_quoting_only_where_needed() {
        assert_eq!(shell_quote("lr=0.01"), "lr=0.01");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
