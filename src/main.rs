//! The `pushbridge` command: parse the CLI, set up tracing, call the library.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use pushbridge::settings::{LogFormat, Settings};
use pushbridge::wire::client::{self, Recipient};
use pushbridge::wire::frame::Status;
use tokio_util::sync::CancellationToken;

/// Pushes are allocated on one worker and freed on another (proxy, dispatcher,
/// connections, APNs sender); glibc's malloc takes its slow paths for that.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--version` names the allocator the binary was built with.
#[cfg(feature = "mimalloc")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (allocator: mimalloc)");
#[cfg(not(feature = "mimalloc"))]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (allocator: system)");

#[derive(Parser)]
#[command(version = VERSION, about = "Push delivery: msgpack proxy in, APNs or MQTT out")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ConfigArg),
    /// Send one push through the proxy, as a backend would.
    Send(SendArgs),
    /// Load the settings and config.json, open every certificate and key.
    CheckConfig(ConfigArg),
    /// Mint an HS256 device token with auth.jwt_secret (tests, demos).
    Token(TokenArgs),
}

#[derive(Args)]
struct TokenArgs {
    /// The user id (the token's `sub`).
    #[arg(long)]
    user: String,
    /// Comma-separated group ids the device may read.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// Lifetime: seconds, or a number with s, m, h or d.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: u64,
    /// Settings file with auth.jwt_secret.
    #[arg(long, default_value = "setting.toml")]
    config: PathBuf,
}

/// `90`, `90s`, `15m`, `1h`, `7d` as seconds.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| format!("bad ttl {text:?}"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("bad ttl unit in {text:?}: use s, m, h or d")),
    };
    match n.checked_mul(scale) {
        Some(secs) if secs > 0 => Ok(secs),
        _ => Err(format!("bad ttl {text:?}")),
    }
}

#[derive(Args)]
struct ConfigArg {
    /// Settings file; missing means every default.
    #[arg(long, default_value = "setting.toml")]
    config: PathBuf,
    /// Log filter (overrides log.level; RUST_LOG overrides both).
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("to").required(true).args(["user", "users", "group"])))]
struct SendArgs {
    /// One user id.
    #[arg(long)]
    user: Option<String>,
    /// Comma-separated user ids.
    #[arg(long, value_delimiter = ',')]
    users: Option<Vec<String>>,
    /// A group id.
    #[arg(long)]
    group: Option<String>,
    /// Proxy address.
    #[arg(long, default_value = "127.0.0.1:7100")]
    addr: String,
    /// The `data` map as JSON, e.g. '{"alert":"hi"}'.
    data: String,
}

fn init_tracing(settings: &Settings, level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(level.unwrap_or(&settings.log.level))
    });
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match settings.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
    token.cancel();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Command::Serve(arg) = cli.command {
        let settings = Settings::load(&arg.config)?;
        if settings.runtime.worker_threads > 0 {
            runtime.worker_threads(settings.runtime.worker_threads);
        }
        return runtime.build()?.block_on(async {
            init_tracing(&settings, arg.log_level.as_deref());
            let shutdown = CancellationToken::new();
            tokio::spawn(shutdown_signal(shutdown.clone()));
            Ok(pushbridge::run(settings, shutdown).await?)
        });
    }
    runtime.build()?.block_on(command(cli.command))
}

/// The commands other than `serve`.
async fn command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => unreachable!("serve builds its own runtime"),
        Command::CheckConfig(arg) => {
            let settings = Settings::load(&arg.config)?;
            init_tracing(&settings, arg.log_level.as_deref().or(Some("warn")));
            println!("settings: {} ok", arg.config.display());
            for warning in pushbridge::config_warnings(&settings) {
                eprintln!("warning: {warning}");
            }
            let apps = pushbridge::check_config(&settings)?;
            if let Some(cert) = &settings.mqtt.tls_cert {
                let used = pushbridge::mqtt::tls_listeners(&settings.mqtt);
                let used = match used.is_empty() {
                    true => "no TLS listener set".to_string(),
                    false => used.join(", "),
                };
                println!("mqtt tls: {} ok ({used})", cert.display());
            }
            if apps.is_empty() {
                println!(
                    "apns: {} lists no apps (APNs off)",
                    settings.apns.config.display()
                );
            }
            let mut broken = 0;
            for (app, check) in &apps {
                match check {
                    Ok(report) => println!("{report}"),
                    Err(e) => {
                        broken += 1;
                        eprintln!("{app}: ERROR {e}");
                    }
                }
            }
            if broken > 0 {
                bail!(
                    "{broken} of {} apps in {} cannot be used",
                    apps.len(),
                    settings.apns.config.display()
                );
            }
        }
        Command::Token(args) => {
            let settings = Settings::load(&args.config)?;
            let token = pushbridge::auth::jwt::device_token(
                &settings.auth,
                &args.user,
                &args.groups,
                args.ttl,
            )
            .with_context(|| format!("settings {}", args.config.display()))?;
            println!("{token}");
        }
        Command::Send(args) => {
            let data: serde_json::Value =
                serde_json::from_str(&args.data).context("data is not JSON")?;
            if !data.is_object() {
                bail!("data must be a JSON object, e.g. '{{\"alert\":\"hi\"}}'");
            }
            let to = match (args.user, args.users, args.group) {
                (Some(u), _, _) => Recipient::User(client::id_value(&u)),
                (_, Some(us), _) => {
                    Recipient::Users(us.iter().map(|u| client::id_value(u)).collect())
                }
                (_, _, Some(g)) => Recipient::Group(client::id_value(&g)),
                _ => unreachable!("clap requires one of --user, --users, --group"),
            };
            let status = client::send(&args.addr, &to, &client::json_to_msgpack(&data)).await?;
            println!("0x{:02x} {}", status as u8, status.meaning());
            if status != Status::Accepted {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
