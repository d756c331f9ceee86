//! `ivado`: a thin CLI over the runtime library.
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ivado_runtime::device::{self, DeviceRequest};
use ivado_runtime::plugin::{PluginRegistry, SearchPath};
use ivado_runtime::script::{run_file, ScriptContext};
use ivado_runtime::{infer, model_folder};
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
        script: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// List the plugins found: name, version, kind and components, and files that failed to load.
    Plugins,
    /// Segment a NIfTI volume with a trained model folder.
    Segment {
        /// Model folder written by training (holds ivado_model.json and model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Input image (.nii or .nii.gz).
        image: PathBuf,
        /// Output mask path.
        #[arg(short, long)]
        output: PathBuf,
        /// Binarisation threshold on the soft prediction.
        #[arg(long, default_value_t = 0.5)]
        threshold: f64,
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
        Command::Run { script, args } => {
            let registry = PluginRegistry::discover(&search);
            let progress = !cli.no_progress && std::io::stderr().is_terminal();
            run_file(
                &script,
                &args,
                ScriptContext {
                    registry,
                    device: device.into(),
                    progress,
                },
            )
        }
        Command::Segment {
            model,
            image,
            output,
            threshold,
        } => {
            let registry = PluginRegistry::discover(&search);
            let loaded = model_folder::load(&model, &registry, device)?;
            let (source, soft) = infer::segment_volume(&loaded, &image, device, 16)?;
            let written = infer::write_segmentation(&source, &soft, &output, threshold)
                .with_context(|| format!("writing {}", output.display()))?;
            for path in written {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
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
