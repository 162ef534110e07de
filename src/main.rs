//! `edgecoder`: parse the command line, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser;
use edgecoder::cli::{Cli, Command};
use edgecoder::config::Config;
use tokio_util::sync::CancellationToken;

fn init_logging(filter: &str) {
    // Under systemd (JOURNAL_STREAM set) journald adds timestamps; colours would be noise.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(!journald && std::env::var_os("NO_COLOR").is_none());
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// Loads the configuration of a long-running service and starts logging; `None` (after printing
/// every problem) when it is invalid.
fn load_service_config(
    args: &edgecoder::cli::ConfigArgs,
    env: &[(String, String)],
) -> Option<Config> {
    match Config::load(&args.overrides(), env) {
        Ok((cfg, file)) => {
            init_logging(&cfg.log);
            if let Some(f) = file {
                tracing::info!(file = %f.display(), "configuration loaded");
            }
            Some(cfg)
        }
        Err(e) => {
            eprintln!("edgecoder: {e}");
            None
        }
    }
}

fn main() -> ExitCode {
    // ggml prints a backtrace with gdb when it aborts; on a box that is slow and leaks paths.
    // Set before any thread starts, so no other thread can be reading the environment.
    #[allow(unsafe_code)]
    // SAFETY: single-threaded at this point (the runtime is built below).
    unsafe {
        std::env::set_var("GGML_NO_BACKTRACE", "1");
    }
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Run(_) | Command::Worker(_) | Command::AnchorProxy(_) | Command::Portal(_)
    ) {
        // Client commands print and exit: `edgecoder hw --json | head` should end quietly when
        // the reader goes away, as other command-line tools do, not panic on a broken pipe.
        // The node and the worker keep Rust's default (SIGPIPE ignored, EPIPE as an error).
        #[allow(unsafe_code)]
        // SAFETY: single-threaded at this point; restoring the default disposition of a signal.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgecoder: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    let result: anyhow::Result<u8> = rt.block_on(async move {
        match cli.command {
            Command::Run(args) => {
                let Some(cfg) = load_service_config(&args, &env) else {
                    return Ok(edgecoder::EXIT_CONFIG);
                };
                let exe = std::env::current_exe()?;
                edgecoder::node::run(cfg, exe, CancellationToken::new()).await?;
                Ok(0)
            }
            Command::Worker(w) => {
                init_logging(&w.log);
                let stop = CancellationToken::new();
                let s = stop.clone();
                tokio::spawn(async move {
                    if let Ok(mut t) =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        t.recv().await;
                        s.cancel();
                    }
                });
                let args = edgecoder::worker::WorkerArgs {
                    coordinator: w.coordinator,
                    key_file: w.key,
                    slots: w.slots,
                    parent_pid: w.parent_pid,
                    inference: w.inference,
                    generation_slots: w.generation_slots,
                    resource_class: w.resource_class,
                };
                edgecoder::worker::run(args, stop, w.grace).await?;
                Ok(0)
            }
            Command::Task(t) => edgecoder::cli::task(t).await,
            Command::Model(m) => edgecoder::cli::model(m).await,
            Command::Apikey(a) => edgecoder::cli::apikey(a).await,
            Command::Status(c) => edgecoder::cli::status(c).await,
            Command::Mesh(m) => edgecoder::cli::mesh(m).await,
            Command::Hw { json, root } => edgecoder::cli::hw(json, &root),
            Command::Keygen { out } => {
                let (id, created) = edgecoder::identity::Identity::load_or_create(&out)?;
                println!("{}", id.key_id());
                eprintln!(
                    "{} {} (node id {})",
                    if created { "created" } else { "read" },
                    out.display(),
                    id.node_id()
                );
                Ok(0)
            }
            Command::Bench(b) => {
                let exe = std::env::current_exe()?;
                match b {
                    edgecoder::cli::BenchCmd::Boot { runs } => {
                        tokio::task::spawn_blocking(move || edgecoder::bench::boot(&exe, runs))
                            .await??
                    }
                    edgecoder::cli::BenchCmd::Idle { settle } => {
                        tokio::task::spawn_blocking(move || edgecoder::bench::idle(&exe, settle))
                            .await??
                    }
                    edgecoder::cli::BenchCmd::Throughput {
                        clients,
                        duration,
                        warmup,
                    } => edgecoder::bench::throughput(&exe, &clients, duration, warmup).await?,
                    edgecoder::cli::BenchCmd::Mesh { tasks } => {
                        edgecoder::bench::mesh(&exe, tasks).await?
                    }
                }
                Ok(0)
            }
            Command::AnchorProxy(args) => {
                let Some(cfg) = load_service_config(&args, &env) else {
                    return Ok(edgecoder::EXIT_CONFIG);
                };
                match edgecoder::anchor_proxy::run(cfg, CancellationToken::new()).await {
                    Ok(()) => Ok(0),
                    Err(edgecoder::anchor_proxy::ProxyError::Config(e)) => {
                        eprintln!("edgecoder: {e}");
                        Ok(edgecoder::EXIT_CONFIG)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Command::Portal(args) => {
                let Some(cfg) = load_service_config(&args, &env) else {
                    return Ok(edgecoder::EXIT_CONFIG);
                };
                edgecoder::portal::run(cfg, CancellationToken::new()).await?;
                Ok(0)
            }
            Command::Anchor(a) => edgecoder::cli::anchor(a).await,
            Command::CheckConfig(args) => match Config::load(&args.overrides(), &env) {
                Ok((cfg, file)) => {
                    println!(
                        "configuration OK ({})",
                        file.map_or("defaults".into(), |f| f.display().to_string())
                    );
                    println!("{cfg:#?}");
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("edgecoder: {e}");
                    Ok(edgecoder::EXIT_CONFIG)
                }
            },
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("edgecoder: {}", edgecoder::cli::describe(&e));
            ExitCode::FAILURE
        }
    }
}
