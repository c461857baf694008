//! An HTTP proxy that only tunnels (`CONNECT`), as egress gateways do,
//! recording every tunnel it opened or refused.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The credentials the proxy asks for when started with
/// [`ConnectProxy::with_credentials`], and their `Proxy-Authorization`.
pub const USER: &str = "egress-user";
pub const PASSWORD: &str = "egress-pass-123";
const EXPECTED_AUTHORIZATION: &str = "Basic ZWdyZXNzLXVzZXI6ZWdyZXNzLXBhc3MtMTIz";

pub struct ConnectProxy {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    task: JoinHandle<()>,
}

#[derive(Default, Clone, Debug)]
pub struct Log {
    /// `host:port` of every tunnel opened.
    pub tunnels: Vec<String>,
    /// Requests refused (wrong method or credentials).
    pub refused: u32,
}

impl ConnectProxy {
    pub async fn open() -> Self {
        Self::start(false).await
    }

    pub async fn with_credentials() -> Self {
        Self::start(true).await
    }

    async fn start(credentials: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let log = Arc::new(Mutex::new(Log::default()));
        let shared = Arc::clone(&log);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(tunnel(stream, credentials, Arc::clone(&shared)));
            }
        });
        Self { addr, log, task }
    }

    /// `http://127.0.0.1:PORT` (with the credentials when `with_auth`).
    pub fn url(&self, with_auth: bool) -> String {
        if with_auth {
            format!("http://{USER}:{PASSWORD}@{}", self.addr)
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub fn log(&self) -> Log {
        self.log.lock().expect("log").clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tunnel(mut client: TcpStream, credentials: bool, log: Arc<Mutex<Log>>) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match client.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => head.extend_from_slice(&buffer[..read]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let authorized = !credentials
        || lines.any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("proxy-authorization") && value.trim() == EXPECTED_AUTHORIZATION
            })
        });
    if method != "CONNECT" {
        return refuse(&mut client, &log, "405 Method Not Allowed").await;
    }
    if !authorized {
        let status = "407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"egress\"";
        return refuse(&mut client, &log, status).await;
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return refuse(&mut client, &log, "502 Bad Gateway").await;
    };
    log.lock().expect("log").tunnels.push(target.to_owned());
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

async fn refuse(client: &mut TcpStream, log: &Mutex<Log>, status: &str) {
    log.lock().expect("log").refused += 1;
    let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
    let _ = client.write_all(answer.as_bytes()).await;
}
