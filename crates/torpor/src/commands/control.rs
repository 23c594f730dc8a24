//! The commands to a running `torpor up`: sleep, wake, pin, unpin, reload, stop.

use std::process::ExitCode;

use anyhow::Result;

use torpor_agent::ManualCommand;
use torpor_image::duration_arg;
use torpor_up::control::{Order, Reply};

use super::{opts::ControlOpt, print_json};

/// A command about one service.
#[derive(Debug, clap::Args)]
pub struct ServiceArgs {
    /// The service's name.
    name: String,
    #[command(flatten)]
    control: ControlOpt,
}

/// Arguments of `torpor pin`.
#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// The service's name.
    name: String,
    /// How long the pin lasts (e.g. 30m, 1h); until `torpor unpin` without it.
    #[arg(long = "for", value_parser = duration_arg)]
    for_: Option<std::time::Duration>,
    #[command(flatten)]
    control: ControlOpt,
}

/// Arguments of `torpor reload`.
#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    control: ControlOpt,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `torpor stop`.
#[derive(Debug, clap::Args)]
pub struct StopArgs {
    #[arg(long)]
    keep_running: bool,
    #[command(flatten)]
    control: ControlOpt,
}

/// `torpor sleep`, `wake`, `unpin`: `command` for the service `args` names.
pub fn service(args: &ServiceArgs, command: ManualCommand) -> Result<ExitCode> {
    manual(&args.control, &args.name, command)
}

/// `torpor pin`.
pub fn pin(args: &PinArgs) -> Result<ExitCode> {
    let for_ms = args.for_.map(|d| d.as_millis().max(1) as u64);
    manual(&args.control, &args.name, ManualCommand::Pin { for_ms })
}

/// `torpor stop`: prints the answer (exit 0 when it stops).
pub fn stop(args: &StopArgs) -> Result<ExitCode> {
    let reply = send(
        &args.control,
        Order::Stop {
            keep_running: args.keep_running,
        },
    )?;
    Ok(report(&reply))
}

/// Prints a reply's message where it belongs; the exit status it means.
fn report(reply: &Reply) -> ExitCode {
    if reply.succeeded() {
        println!("{}", reply.message);
        ExitCode::SUCCESS
    } else {
        eprintln!("torpor: {}", reply.message);
        ExitCode::FAILURE
    }
}

/// Sends one manual command; prints its answer (exit 0 when done or nothing was needed).
fn manual(opt: &ControlOpt, name: &str, command: ManualCommand) -> Result<ExitCode> {
    let order = Order::Service {
        service: name.to_string(),
        command,
    };
    Ok(report(&send(opt, order)?))
}

/// Asks for a reload; prints what it did (exit 0 when applied or nothing changed).
pub fn reload(args: &ReloadArgs) -> Result<ExitCode> {
    let reply = send(&args.control, Order::Reload)?;
    match (args.json, &reply.reload) {
        (true, Some(r)) => print_json(r)?,
        _ if reply.succeeded() => print!("{}", reply.message),
        _ => eprint!("torpor: {}", reply.message),
    }
    Ok(match reply.succeeded() {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

/// Sends `order` to the control endpoint `opt` names and returns its reply.
fn send(opt: &ControlOpt, order: Order) -> Result<Reply> {
    let rt = tokio::runtime::Runtime::new()?;
    let target = rt.block_on(torpor_up::control::locate(
        opt.socket.as_deref(),
        opt.control,
        opt.addr,
        opt.token_file.as_deref(),
    ))?;
    Ok(torpor_up::control::call(&target, order)?)
}
