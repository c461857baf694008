//! nginx as the comparison layer (c) of the pass-through scenario: found
//! on `PATH`, in the usual sbin folders or through `NGINX`, and run from a
//! generated config as a plain keep-alive reverse proxy.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::processes::Process;

/// Runs nginx as a plain keep-alive reverse proxy to `upstream`.
pub fn start_nginx(
    nginx: &Path,
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<Process, String> {
    let prefix = dir.join("nginx");
    fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
    let user = if running_as_root() { "user root;\n" } else { "" };
    let p = prefix.display();
    let conf = format!(
        "{user}daemon off;\nmaster_process on;\nworker_processes 2;\npid {p}/nginx.pid;\n\
         error_log {p}/logs/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n\
         client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n  \
         uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
         upstream marketo {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}\n\
         server {{\n    listen {listen};\n    keepalive_requests 1000000;\n\
         location / {{ proxy_pass http://marketo; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
    );
    let conf_path = prefix.join("nginx.conf");
    fs::write(&conf_path, conf).expect("nginx.conf");
    let prefix_arg = prefix.display().to_string();
    let conf_arg = conf_path.display().to_string();
    let log_arg = prefix.join("logs/error.log").display().to_string();
    let args = ["-p", &prefix_arg, "-c", &conf_arg, "-e", &log_arg];
    // An nginx that cannot run this config (too old for `-e`, no
    // permission) is skipped like a missing one.
    let test = Command::new(nginx).arg("-t").args(args).output();
    match test {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Err(error) => return Err(error.to_string()),
    }
    let mut process = Process::spawn("nginx", nginx, &args, dir);
    // nginx's master forwards SIGTERM to its workers; SIGKILL would orphan them.
    process.terminate_gently = true;
    Ok(process)
}

pub fn find_nginx() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NGINX") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}
