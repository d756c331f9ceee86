//! `ivado`: a thin CLI over the runtime library.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ivado_runtime::device::{self, DeviceRequest};
use ivado_runtime::plugin::{PluginRegistry, SearchPath};
use ivado_runtime::script::{run_file_with_params, ScriptContext};
use ivado_runtime::{bench, cascade, infer, model_folder, scaffold, sweep, torchscript, transfer};
use ivado_runtime::{bench_augment, preview};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// ivado: medical image segmentation experiments as Rhai scripts, with architectures and transforms as
/// dynamic plugins.
#[derive(Parser)]
#[command(name = "ivado", version, about, long_about = None)]
struct Cli {
    /// Compute device: cpu, cuda, cuda:N, or auto (CUDA when available).
    #[arg(long, global = true, default_value = "auto", env = "IVADO_DEVICE")]
    device: DeviceRequest,

    /// Extra directory (or library file) to load plugins from; repeatable. IVADO_PLUGIN_PATH adds more.
    #[arg(long = "plugin-dir", global = true, value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,

    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Hide progress bars.
    #[arg(long, global = true)]
    no_progress: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment script; arguments after the script are available to it as ARGS.
    Run {
        /// Script parameter, available as `PARAMS.key` (int, float, bool, JSON list, else string); repeatable.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Hot-reload the augmentation steps' script files and plugin libraries while training (as `watch`).
        #[arg(long)]
        watch: bool,
        script: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run an experiment script with hot reload: when a script transform's file or a transform plugin's
    /// library used for augmentation changes, the next training batch uses the new version.
    Watch {
        /// Script parameter, available as `PARAMS.key`; repeatable.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        script: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a script over a grid or random search of parameters and seeds, then tabulate the results.
    Sweep {
        /// Sweep file (JSON): script, args, out, grid or random, params, seeds, parallel, devices.
        file: PathBuf,
        /// Run nothing: write a Slurm job array (jobs.txt, sweep.sbatch) for the incomplete runs.
        #[arg(long, conflicts_with = "collect")]
        slurm: bool,
        /// Run nothing: only aggregate the complete runs into sweep.csv and summary.csv.
        #[arg(long)]
        collect: bool,
    },
    /// Evaluate a folder of predictions against BIDS labels (ivadomed's evaluation_3Dmetrics.csv, summary,
    /// painted TP/FP/FN lesion maps) and optionally sweep the binarisation threshold.
    Evaluate(ivado_runtime::evaluate::EvaluateArgs),
    /// Test a training run on its recorded test split (ivadomed's --test): predictions in pred_masks/,
    /// ivadomed's evaluation CSV in results_eval/, QC overlays in test_qc/, and a summary.
    Test(ivado_runtime::testing::TestArgs),
    /// Paired comparison of per-image test Dice of two runs or configurations (Wilcoxon, paired t-test).
    Compare {
        /// A run folder (with evaluation.csv) or a configuration folder (seed runs, averaged per image).
        a: PathBuf,
        b: PathBuf,
    },
    /// List the plugins found: name, version, kind and components, and files that failed to load.
    Plugins,
    /// Segment volumes with a trained model folder: images, multi-contrast volumes (a.nii.gz,b.nii.gz), BIDS
    /// folders or list files. Writes <stem>_pred.nii.gz (per class: <stem>_class-<k>_pred.nii.gz), and with
    /// --tta/--mc-dropout the soft map and ivadomed's uncertainty maps (_soft, _unc-vox, _unc-iou, _unc-cv,
    /// _unc-avgUnc).
    Segment(SegmentArgs),
    /// Print an architecture's layers and parameter counts, from a model folder or a name and config.
    Summary {
        /// A model folder, or an architecture name such as `unet2d` or `unet:unet3d`.
        target: String,
        /// Architecture config as JSON, e.g. '{"depth": 4}' (ignored for a model folder).
        #[arg(long, default_value = "{}")]
        config: String,
    },
    /// Export a model folder to TorchScript by tracing, and check the traced module reproduces the plugin.
    Export {
        /// Model folder.
        #[arg(long)]
        model: PathBuf,
        /// Output TorchScript file (.pt).
        #[arg(short, long)]
        output: PathBuf,
        /// Shape of each example input, e.g. 1,1,128,128; repeat for extra inputs (FiLM metadata, HeMIS mask).
        /// Default: one batch of 1 x in_channels x 128 x 128.
        #[arg(long = "input-shape", value_name = "SHAPE")]
        input_shapes: Vec<String>,
    },
    /// Show what a transform pipeline does to one axial slice: a PNG with one row per random draw and one
    /// column per step (ivadomed's visualize_transforms).
    PreviewTransforms {
        /// Pipeline file: a JSON list of {"name", "config"} steps, a model folder's ivado_model.json, or an
        /// ivadomed config (its "transformation" object).
        #[arg(long)]
        config: PathBuf,
        /// Image (.nii or .nii.gz).
        #[arg(long)]
        image: PathBuf,
        /// Its label, drawn as a contour.
        #[arg(long)]
        label: Option<PathBuf>,
        /// Random draws (rows).
        #[arg(short = 'n', long = "draws", default_value_t = 4)]
        draws: usize,
        /// Axial slice index (default: the middle slice).
        #[arg(long)]
        slice: Option<usize>,
        /// Output folder; the PNG is preview_<image stem>.png.
        #[arg(short = 'o', long = "out", default_value = ".")]
        out: PathBuf,
        /// Seed of the draws.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Minimum size in pixels of the original slice's tile (integer upscaling).
        #[arg(long, default_value_t = preview::DEFAULT_TILE_SIZE)]
        tile_size: usize,
    },
    /// Measure speed; prints figures to set beside ivadomed's.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Create a new plugin crate, with an example architecture and tests, that builds against this SDK.
    NewPlugin {
        /// Plugin (and crate) name: lower-case letters, digits and `_`.
        name: String,
        /// Where to create it (default: ./<name>).
        #[arg(long)]
        path: Option<PathBuf>,
        /// The ivado SDK sources (default: the ones this binary was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct SegmentArgs {
    /// Model folder written by training (holds ivado_model.json and model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Images (.nii/.nii.gz), comma-separated channels of one volume, BIDS folders or list files.
    inputs: Vec<String>,
    /// One channel of a single multi-contrast volume, in the model's channel order; repeatable.
    #[arg(long = "channel", value_name = "IMAGE")]
    channels: Vec<PathBuf>,
    /// Output folder, or the mask file itself (a .nii/.nii.gz path) for one volume.
    #[arg(short, long, default_value = ".")]
    output: PathBuf,
    /// Binarisation threshold on the soft prediction.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// Also write the soft prediction (_soft).
    #[arg(long)]
    soft: bool,
    /// Slice axis of a 2D model: axial, sagittal or coronal (default: the model folder's).
    #[arg(long)]
    slice_axis: Option<String>,
    /// Tile size: 2 numbers for 2D patches within slices, 3 for 3D subvolumes (e.g. 64,64 or 48,48,16).
    #[arg(long)]
    patch: Option<String>,
    /// Tile stride (default: the patch size, no overlap).
    #[arg(long)]
    stride: Option<String>,
    /// Run the whole volume at once (3D models).
    #[arg(long)]
    whole_volume: bool,
    /// Weight overlapping tiles with nnU-Net's Gaussian instead of ivadomed's plain average.
    #[arg(long)]
    gaussian: bool,
    /// Tiles per forward pass [default: 2 on a CPU, where small batches run faster; 16 on a GPU].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Forward precision: auto (the model folder's `inference.precision`, else bf16 on a CPU or GPU with
    /// native bf16, else fp32), fp32, bf16 or fp16 (CUDA).
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Keep the stitching buffers in host memory.
    #[arg(long)]
    stitch_on_cpu: bool,
    /// Test-time augmentation passes with the training augmentations (aleatoric uncertainty).
    #[arg(long, default_value_t = 0)]
    tta: usize,
    /// Monte-Carlo dropout passes (epistemic uncertainty).
    #[arg(long, default_value_t = 0)]
    mc_dropout: usize,
    /// With --tta/--mc-dropout, write only the averaged mask (TTA for accuracy), not the soft and
    /// uncertainty maps.
    #[arg(long)]
    no_uncertainty_maps: bool,
    /// Seed of the test-time augmentation draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// FiLM metadata KEY=VALUE, over the image's JSON sidecar; repeatable.
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    metadata: Vec<String>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Forward + backward step time of each architecture plugin at ivadomed's default sizes.
    Arch {
        /// Only these architectures (repeatable); default: all built-in ones.
        #[arg(long = "arch", value_name = "NAME")]
        architectures: Vec<String>,
        /// Timed steps per architecture (the median is reported).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// libtorch intra-op threads (default: libtorch's choice).
        #[arg(long)]
        threads: Option<i32>,
    },
    /// Training step of ivadomed's default 2D U-Net (depth 3, 64 filters) in fp32, channels-last and bf16.
    Train {
        /// Batch size.
        #[arg(long, default_value_t = 32)]
        batch: i64,
        /// Slice edge in pixels.
        #[arg(long, default_value_t = 128)]
        size: i64,
        /// Timed steps per mode (the median is reported).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// libtorch intra-op threads (default: libtorch's choice).
        #[arg(long)]
        threads: Option<i32>,
        /// Also train full epochs of this many batches through the loader (augmented phantom slices) and
        /// compare with the bare step time: the loader's overhead.
        #[arg(long, value_name = "BATCHES")]
        epoch: Option<usize>,
        /// Loader workers of the epoch.
        #[arg(long, default_value_t = ivado_runtime::loader::LoaderOptions::default().num_workers)]
        workers: usize,
    },
    /// Seconds per volume of `segment` on a generated volume: default 2D U-Net on slices and a 3D U-Net on
    /// subvolumes, without and with test-time augmentation.
    Segment {
        /// Volume shape X,Y,Z.
        #[arg(long, default_value = "256,256,64")]
        shape: String,
        /// Test-time augmentation passes of the TTA rows.
        #[arg(long, default_value_t = 2)]
        tta: usize,
        /// Timed runs per case (the median is reported), after one warm-up.
        #[arg(long, default_value_t = 1)]
        repeats: usize,
        /// ivadomed's seconds per volume for a case, printed beside ours: LABEL=SECONDS (2d, 2d_tta, 2d_unc,
        /// 3d, 3d_tta, 3d_unc, 2d_fp32, 3d_fp32); repeatable.
        #[arg(long = "ivadomed", value_name = "LABEL=SECONDS")]
        ivadomed: Vec<String>,
        /// libtorch intra-op threads (default: libtorch's choice).
        #[arg(long)]
        threads: Option<i32>,
        /// Only this case (2d, 2d_tta, 2d_unc, 3d, 3d_tta, 3d_unc, 2d_fp32, 3d_fp32); repeatable. Default:
        /// all.
        #[arg(long = "case", value_name = "LABEL")]
        cases: Vec<String>,
    },
    /// Samples/s of the training augmentation pipeline on 2D slices and 3D subvolumes, 1 and T workers.
    Augment {
        /// Timed samples per row.
        #[arg(long, default_value_t = 100)]
        steps: usize,
        /// Untimed samples first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Worker threads of the second row (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Slices/s of 2D training-slice loading through the loader and volume caches (cold and cached, 1 worker
    /// and all), and peak memory with the cache budget on and off, for two dataset sizes.
    Loader {
        /// Where the generated phantom dataset is kept between runs.
        #[arg(long, default_value_os_t = std::env::temp_dir().join("ivado-bench-loader-data"))]
        data: PathBuf,
        /// Subjects of the main cases.
        #[arg(long, default_value_t = 50)]
        subjects: usize,
        /// Subjects of the comparison cases (memory must not grow with them when the budget is on).
        #[arg(long, default_value_t = 100)]
        more_subjects: usize,
        /// Memory budget of the volume cache, in MiB.
        #[arg(long, default_value_t = 256)]
        budget_mb: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Volumes whose slices are shuffled together.
        #[arg(long, default_value_t = 8)]
        window: usize,
        /// ivadomed's slices/s on this pipeline, the reference of the ratio column: what
        /// scripts/ivadomed/loader_bench.py prints (default: the 4.3 ms/slice).
        #[arg(long = "ivadomed", value_name = "SLICES_PER_SECOND",
              default_value_t = ivado_runtime::bench_loader::IVADOMED_SLICES_PER_SECOND)]
        ivadomed_slices_per_second: f64,
        /// Internal: run one case (JSON) in this process and print its result.
        #[arg(long, hide = true)]
        case: Option<String>,
    },
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn run(cli: Cli) -> Result<()> {
    // Before anything touches CUDA: libtorch caches whether CUDA is available.
    let device = device::resolve(cli.device)?;
    let search = SearchPath::standard(&cli.plugin_dirs);
    match cli.command {
        Command::Plugins => {
            let registry = PluginRegistry::discover(&search);
            if registry.libraries.is_empty() && registry.failures.is_empty() {
                println!(
                    "no plugins found (searched {:?} and {:?})",
                    search.builtin, search.extra
                );
            }
            for library in &registry.libraries {
                println!(
                    "{} {}  [{}]  {}",
                    library.name,
                    library.version,
                    library.kind(),
                    library.path.display()
                );
                for (kind, components) in [
                    ("architecture", &library.architectures),
                    ("transform", &library.transforms),
                ] {
                    for component in components.iter() {
                        println!(
                            "    {kind:<12} {:<20} {}",
                            component.name, component.summary
                        );
                        println!("    {:<12} {:<20} defaults: {}", "", "", component.defaults);
                    }
                }
            }
            for (path, error) in &registry.failures {
                println!("FAILED {}: {error}", path.display());
            }
            Ok(())
        }
        Command::Run {
            script,
            params,
            args,
            watch,
        } => run_script(
            &search,
            device,
            cli.no_progress,
            &script,
            &args,
            &params,
            watch,
        ),
        Command::Watch {
            script,
            params,
            args,
        } => run_script(
            &search,
            device,
            cli.no_progress,
            &script,
            &args,
            &params,
            true,
        ),
        Command::Sweep {
            file,
            slurm,
            collect,
        } => {
            let mode = match (slurm, collect) {
                (true, _) => sweep::SweepMode::Slurm,
                (_, true) => sweep::SweepMode::Collect,
                _ => sweep::SweepMode::Run,
            };
            let flags = sweep::ChildFlags {
                device: cli.device.to_string(),
                plugin_dirs: cli.plugin_dirs.clone(),
            };
            sweep::sweep_command(&file, mode, &flags)
        }
        Command::Compare { a, b } => sweep::compare_command(&a, &b),
        Command::Evaluate(args) => ivado_runtime::evaluate::evaluate_command(&args),
        Command::Test(args) => {
            let registry = PluginRegistry::discover(&search);
            ivado_runtime::testing::test_command(&args, &registry, device)
        }
        Command::Segment(args) => {
            let registry = PluginRegistry::discover(&search);
            let loaded = model_folder::load(&args.model, &registry, device)?;
            let precision = ivado_runtime::precision::Precision::parse_request(&args.precision)?;
            if let Some(precision) = precision {
                precision.check(device)?;
            }
            let batch_size = args
                .batch_size
                .unwrap_or_else(|| infer::default_batch_size(device))
                .max(1);
            let options = infer::SegmentOptions {
                sampling: infer::SamplingOverride {
                    slice_axis: args
                        .slice_axis
                        .as_deref()
                        .map(ivado_runtime::tiling::SliceAxis::from_name)
                        .transpose()?,
                    patch: args
                        .patch
                        .as_deref()
                        .map(infer::parse_size_list)
                        .transpose()?,
                    stride: args
                        .stride
                        .as_deref()
                        .map(infer::parse_size_list)
                        .transpose()?,
                    whole_volume: args.whole_volume,
                },
                gaussian: args.gaussian,
                batch_size,
                device,
                precision,
                stitch_on_cpu: args.stitch_on_cpu,
                tta: args.tta,
                mc_dropout: args.mc_dropout,
                seed: args.seed,
                threshold: args.threshold,
                soft: args.soft,
                no_uncertainty_maps: args.no_uncertainty_maps,
                metadata: infer::parse_metadata(&args.metadata)?,
                progress: !cli.no_progress && std::io::stderr().is_terminal(),
            };
            let inputs = infer::expand_inputs(&args.inputs, &args.channels, &loaded)?;
            let target = infer::OutputTarget::from_path(&args.output);
            if cascade::detection_stage(Some(args.model.as_path()), &loaded.description)?.is_some()
            {
                // Object-detection cascade: detection, crop, this model, padded back (see cascade.rs).
                for input in &inputs {
                    let [image] = input.channels.as_slice() else {
                        bail!(
                            "a cascade model segments single-contrast images; got {} channels",
                            input.channels.len()
                        );
                    };
                    let prediction = cascade::segment(
                        &loaded,
                        Some(args.model.as_path()),
                        &registry,
                        image,
                        device,
                        batch_size,
                    )?;
                    let output = match &target {
                        infer::OutputTarget::File(path) => path.clone(),
                        infer::OutputTarget::Folder(dir) => {
                            dir.join(format!("{}_pred.nii.gz", input.stem()))
                        }
                    };
                    let written = infer::write_segmentation(
                        &prediction.source,
                        &prediction.soft,
                        &output,
                        args.threshold,
                    )
                    .with_context(|| format!("writing {}", output.display()))?;
                    for path in written {
                        println!("wrote {}", path.display());
                    }
                }
                return Ok(());
            }
            for written in infer::segment_inputs(&loaded, &inputs, &target, &options)? {
                for path in written {
                    println!("wrote {}", path.display());
                }
            }
            Ok(())
        }
        Command::Summary { target, config } => {
            let registry = PluginRegistry::discover(&search);
            let folder = std::path::Path::new(&target);
            let model = if folder.join(model_folder::CONFIG_FILE).is_file() {
                model_folder::load(folder, &registry, device)?.model
            } else {
                let config: serde_json::Value =
                    serde_json::from_str(&config).context("--config is not valid JSON")?;
                registry.model(&target, &config, device)?
            };
            print!("{}", transfer::summary(&model));
            Ok(())
        }
        Command::Export {
            model,
            output,
            input_shapes,
        } => {
            let registry = PluginRegistry::discover(&search);
            let loaded = model_folder::load(&model, &registry, device)?;
            let shapes = if input_shapes.is_empty() {
                let channels = ["in_channels", "in_channel"]
                    .iter()
                    .find_map(|key| loaded.model.config[key].as_i64())
                    .unwrap_or(1);
                vec![vec![1, channels, 128, 128]]
            } else {
                input_shapes
                    .iter()
                    .map(|s| torchscript::parse_shape(s))
                    .collect::<Result<_>>()?
            };
            let check = torchscript::export(&loaded.model, &shapes, &output)?;
            println!(
                "wrote {} (traced on {shapes:?}; max difference from the plugin {:.2e})",
                output.display(),
                check.max_abs_difference
            );
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Arch {
                    architectures,
                    steps,
                    warmup,
                    threads,
                },
        } => {
            let registry = PluginRegistry::discover(&search);
            if let Some(threads) = threads {
                tch::set_num_threads(threads);
            }
            let cases: Vec<bench::ArchitectureCase> = bench::default_cases()
                .into_iter()
                .filter(|case| {
                    architectures.is_empty() || architectures.contains(&case.architecture)
                })
                .collect();
            println!(
                "forward+backward step on {} ({} threads), median of {steps} after {warmup} warm-up",
                device::describe(device),
                tch::get_num_threads()
            );
            println!(
                "{:<16} {:>12}  {:<28} {:>10} {:>10}",
                "architecture", "parameters", "inputs", "median s", "min s"
            );
            for case in &cases {
                let timing = bench::time_case(&registry, case, device, warmup, steps)?;
                println!(
                    "{:<16} {:>12}  {:<28} {:>10.4} {:>10.4}",
                    timing.architecture,
                    timing.parameters,
                    format!("{:?}", timing.inputs),
                    timing.median_seconds,
                    timing.min_seconds
                );
            }
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Train {
                    batch,
                    size,
                    steps,
                    warmup,
                    threads,
                    epoch,
                    workers,
                },
        } => {
            let registry = PluginRegistry::discover(&search);
            if let Some(threads) = threads {
                tch::set_num_threads(threads);
            }
            let case = bench::ArchitectureCase {
                architecture: "unet2d".into(),
                config: serde_json::json!({"depth": 3, "n_filters": 64}),
                inputs: vec![vec![batch, 1, size, size]],
            };
            println!(
                "training step (forward, Dice loss, backward, Adam) of unet2d depth 3, 64 filters, batch {batch} of 1x{size}x{size}, on {} ({} threads), median of {steps}",
                device::describe(device),
                tch::get_num_threads()
            );
            let modes = [
                bench::StepMode::Fp32,
                bench::StepMode::ChannelsLast,
                bench::StepMode::Bf16,
            ];
            let mut fp32 = None;
            for mode in modes {
                let seconds =
                    bench::time_training_step(&registry, &case, mode, device, warmup, steps)?;
                let baseline = *fp32.get_or_insert(seconds);
                println!(
                    "{:<20} {:>8.3} s/step  {:>7.1} slices/s  {:>5.2}x",
                    mode.label(),
                    seconds,
                    batch as f64 / seconds,
                    baseline / seconds
                );
            }
            if let Some(batches) = epoch {
                let timing = bench::time_epoch(&registry, &case, device, batches, workers)?;
                println!("{timing}");
            }
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Loader {
                    data,
                    subjects,
                    more_subjects,
                    budget_mb,
                    batch,
                    window,
                    ivadomed_slices_per_second,
                    case,
                },
        } => {
            let registry = PluginRegistry::discover(&search);
            if let Some(case) = case {
                return ivado_runtime::bench_loader::child(&registry, &data, &case);
            }
            let mut global = vec!["--device".to_owned(), "cpu".to_owned()];
            for dir in &cli.plugin_dirs {
                global.push("--plugin-dir".into());
                global.push(dir.display().to_string());
            }
            let report = ivado_runtime::bench_loader::run(
                &std::env::current_exe()?,
                &global,
                &ivado_runtime::bench_loader::LoaderBench {
                    data,
                    subjects,
                    more_subjects,
                    budget_mb,
                    batch_size: batch,
                    window,
                    ivadomed_slices_per_second,
                },
            )?;
            print!("{report}");
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Augment {
                    steps,
                    warmup,
                    threads,
                },
        } => {
            let registry = PluginRegistry::discover(&search);
            print!(
                "{}",
                bench_augment::run(&registry, device, steps, warmup, threads)?
            );
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Segment {
                    shape,
                    tta,
                    repeats,
                    ivadomed,
                    threads,
                    cases,
                },
        } => {
            let registry = PluginRegistry::discover(&search);
            if let Some(threads) = threads {
                tch::set_num_threads(threads);
            }
            let shape = infer::parse_size_list(&shape)?;
            let shape: [i64; 3] = shape
                .try_into()
                .map_err(|s| anyhow::anyhow!("--shape needs 3 sizes, got {s:?}"))?;
            let mut reference = std::collections::BTreeMap::new();
            for pair in &ivadomed {
                let (label, seconds) = pair
                    .split_once('=')
                    .context("--ivadomed takes LABEL=SECONDS")?;
                reference.insert(
                    label.to_owned(),
                    seconds
                        .parse::<f64>()
                        .with_context(|| format!("--ivadomed {pair}"))?,
                );
            }
            ivado_runtime::bench_segment::run(
                &mut std::io::stdout(),
                &registry,
                device,
                shape,
                tta,
                repeats.max(1),
                &reference,
                &cases,
            )
        }
        Command::PreviewTransforms {
            config,
            image,
            label,
            draws,
            slice,
            out,
            seed,
            tile_size,
        } => {
            let registry = PluginRegistry::discover(&search);
            let options = preview::PreviewOptions {
                pipeline_file: config,
                image,
                label,
                draws,
                slice,
                out_dir: out,
                seed,
                tile_size,
            };
            let written = preview::preview_transforms(&registry, &options, device)?;
            for draw in &written.draws {
                let records: Vec<String> = draw
                    .records
                    .iter()
                    .map(|(step, record)| format!("{step} {record}"))
                    .collect();
                println!("draw seed {}: {}", draw.seed, records.join("; "));
            }
            println!(
                "wrote {} (axial slice {}, {} draws x {} columns: {})",
                written.path.display(),
                written.slice,
                written.draws.len(),
                written.columns.len(),
                written.columns.join(", ")
            );
            Ok(())
        }
        Command::NewPlugin { name, path, sdk } => {
            let dir = path.unwrap_or_else(|| PathBuf::from(&name));
            let sdk = sdk.unwrap_or_else(scaffold::default_sdk_dir);
            for file in scaffold::new_plugin(&name, &dir, &sdk)? {
                println!("wrote {}", file.display());
            }
            println!(
                "next: cd {} && cargo test --release && ivado --plugin-dir target/release plugins",
                dir.display()
            );
            Ok(())
        }
    }
}

fn run_script(
    search: &SearchPath,
    device: tch::Device,
    no_progress: bool,
    script: &std::path::Path,
    args: &[String],
    params: &[String],
    watch: bool,
) -> Result<()> {
    let params = sweep::parse_params(params)?;
    let registry = PluginRegistry::discover(search);
    let progress = !no_progress && std::io::stderr().is_terminal();
    let watcher = if watch {
        Some(std::sync::Arc::new(ivado_runtime::watch::Watcher::new()?))
    } else {
        None
    };
    run_file_with_params(
        script,
        args,
        &params,
        ScriptContext {
            registry,
            device: device.into(),
            progress,
            watcher,
        },
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
