//! Weights & Biases without a W&B library: the run's TensorBoard event files are what
//! `wandb sync --sync-tensorboard` uploads. At the end of a run with `wandb.project` set, the
//! sync runs when the `wandb` CLI is installed and logged in; otherwise the exact command is
//! printed to run later.

use crate::config::WandbSection;
use std::path::Path;
use std::process::Command;

/// The `wandb sync` invocation for `run_dir`, as program arguments.
pub fn sync_args(config: &WandbSection, run_dir: &Path) -> Vec<String> {
    let mut args = vec!["sync".to_string(), "--sync-tensorboard".to_string()];
    if let Some(project) = &config.project {
        args.extend(["-p".into(), project.clone()]);
    }
    if let Some(entity) = &config.entity {
        args.extend(["-e".into(), entity.clone()]);
    }
    if let Some(name) = &config.run_name {
        args.extend(["--id".into(), run_id(name)]);
    }
    args.push(run_dir.display().to_string());
    args
}

/// W&B run ids allow letters, digits, '-' and '_'.
fn run_id(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn shell_quote(arg: &str) -> String {
    if arg
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=@".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn command_line(config: &WandbSection, run_dir: &Path) -> String {
    let mut line = String::new();
    if let Some(name) = &config.run_name {
        line += &format!("WANDB_NAME={} ", shell_quote(name));
    }
    line += "wandb";
    for arg in sync_args(config, run_dir) {
        line += " ";
        line += &shell_quote(&arg);
    }
    line
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .any(|dir| std::fs::metadata(dir.join(program)).is_ok_and(|m| m.is_file()))
    })
}

/// Why an upload cannot happen now, if it cannot.
fn offline_reason() -> Option<String> {
    if !on_path("wandb") {
        return Some("the wandb CLI is not installed (pip install wandb)".into());
    }
    if let Ok(mode) = std::env::var("WANDB_MODE") {
        if mode == "offline" || mode == "disabled" {
            return Some(format!("WANDB_MODE={mode}"));
        }
    }
    if std::env::var("WANDB_API_KEY").is_ok_and(|k| !k.is_empty()) {
        return None;
    }
    let netrc = std::env::var_os("NETRC")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".netrc")));
    let logged_in = netrc
        .and_then(|p| std::fs::read_to_string(p).ok())
        .is_some_and(|text| text.contains("api.wandb.ai"));
    (!logged_in).then(|| "not logged in to W&B (wandb login, or WANDB_API_KEY)".into())
}

/// Uploads the run, or says how to.
pub fn sync(config: &WandbSection, run_dir: &Path) {
    if config.project.is_none() {
        return;
    }
    if let Some(reason) = offline_reason() {
        println!(
            "W&B: {reason}; to upload this run later:\n  {}",
            command_line(config, run_dir)
        );
        return;
    }
    let mut command = Command::new("wandb");
    command.args(sync_args(config, run_dir));
    if let Some(name) = &config.run_name {
        command.env("WANDB_NAME", name);
    }
    match command.status() {
        Ok(status) if status.success() => println!("W&B: uploaded {}", run_dir.display()),
        outcome => {
            let why = match outcome {
                Ok(status) => format!("wandb sync exited with {status}"),
                Err(e) => format!("wandb sync did not start: {e}"),
            };
            tracing::warn!("W&B: {why}; to retry:\n  {}", command_line(config, run_dir));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_command_names_project_entity_and_run() {
        let config = WandbSection {
            project: Some("gfn".into()),
            entity: Some("lab".into()),
            run_name: Some("tb 4x8/seed 0".into()),
        };
        assert_eq!(
            command_line(&config, Path::new("runs/a b")),
            "WANDB_NAME='tb 4x8/seed 0' wandb sync --sync-tensorboard -p gfn -e lab --id tb-4x8-seed-0 'runs/a b'"
        );
    }
}
