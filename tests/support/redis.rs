//! A real `redis-server` on an ephemeral port, for the tests of limits
//! shared between replicas. Stopped when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Child,
    /// Where the server keeps its files; taken by [`RedisServer::crash`].
    dir: Option<tempfile::TempDir>,
    /// Every write goes to an append-only file in `dir` before it is
    /// answered.
    appendonly: bool,
}

/// A server killed by [`RedisServer::crash`], with the files it wrote.
pub struct Crashed {
    port: u16,
    dir: tempfile::TempDir,
    appendonly: bool,
}

impl Crashed {
    /// Starts the server again on its port: with the data it had written
    /// (`keep_data`, which needs [`RedisServer::start_persistent`]), or
    /// empty, as one without persistence comes back.
    pub fn restart(self, keep_data: bool) -> RedisServer {
        assert!(!keep_data || self.appendonly, "no data was kept");
        let dir = if keep_data {
            self.dir
        } else {
            tempfile::tempdir().expect("temporary directory")
        };
        RedisServer::start_with(self.port, &[], Some(dir), self.appendonly)
    }
}

impl RedisServer {
    /// Starts `redis-server` from PATH on a free port and waits until it
    /// answers PING.
    pub fn start() -> Self {
        let port = free_port();
        Self::start_on(port)
    }

    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, &[], None, false)
    }

    /// Starts `redis-server` with an append-only file that holds every
    /// write before it is answered, so that it can [`crash`] and come back
    /// with its data.
    ///
    /// [`crash`]: Self::crash
    pub fn start_persistent() -> Self {
        Self::start_with(free_port(), &[], None, true)
    }

    /// Redis with ACL users besides the default one: `(name, password)`,
    /// each allowed everything until [`shut_out`].
    ///
    /// [`shut_out`]: Self::shut_out
    pub fn start_with_users(users: &[(&str, &str)]) -> Self {
        let args: Vec<String> = users
            .iter()
            .flat_map(|(name, password)| {
                ["--user", name, "on", &format!(">{password}"), "~*", "&*", "+@all"].map(str::to_owned)
            })
            .collect();
        Self::start_with(free_port(), &args, None, false)
    }

    /// Shuts the ACL user `name` out (`off`, its connections closed) or
    /// lets it in again, as a network partition between it and Redis
    /// would.
    pub async fn shut_out(&self, name: &str, out: bool) {
        let mut connection = self.connection().await;
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(name)
            .arg(if out { "off" } else { "on" })
            .query_async::<()>(&mut connection)
            .await
            .expect("ACL SETUSER");
        if out {
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("USER")
                .arg(name)
                .query_async::<()>(&mut connection)
                .await
                .expect("CLIENT KILL");
        }
    }

    /// Redis serving TLS only, with `cert_pem` / `key_pem`, and one ACL
    /// user `user` with `password` besides the default one, which is off.
    pub fn start_tls(cert_pem: &str, key_pem: &str, user: &str, password: &str) -> Self {
        let files = tempfile::tempdir().expect("temporary directory");
        let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
        std::fs::write(&cert, cert_pem).expect("write certificate");
        std::fs::write(&key, key_pem).expect("write key");
        let port = free_port();
        let args = [
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            cert.display().to_string(),
            "--tls-key-file".to_owned(),
            key.display().to_string(),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
            "--user".to_owned(),
            "default".to_owned(),
            "off".to_owned(),
            "--user".to_owned(),
            user.to_owned(),
            "on".to_owned(),
            format!(">{password}"),
            "~*".to_owned(),
            "&*".to_owned(),
            "+@all".to_owned(),
        ];
        Self::start_with(port, &args, Some(files), false)
    }

    fn start_with(port: u16, extra: &[String], files: Option<tempfile::TempDir>, appendonly: bool) -> Self {
        let dir = files.unwrap_or_else(|| tempfile::tempdir().expect("temporary directory"));
        let tls = extra.iter().any(|arg| arg == "--tls-port");
        let mut command = Command::new("redis-server");
        if !tls {
            command.args(["--port", &port.to_string()]);
        }
        let child = command
            .args(extra)
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", if appendonly { "yes" } else { "no" }])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (Debian package redis-server)");
        let server = Self {
            port,
            child,
            dir: Some(dir),
            appendonly,
        };
        let started = Instant::now();
        // A TLS port is ready once it accepts; a plain one answers PING.
        while !(if tls { server.accepts() } else { server.answers() }) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn accepts(&self) -> bool {
        TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        let mut answer = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is
    /// answered, as with a Redis that is overloaded or swapping.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT): it then runs what it was sent.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// A connection for looking at what the replicas wrote.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }

    /// Field `field` of the day counts the replicas keep under `prefix`,
    /// one for each day Redis holds.
    pub async fn day_counts(&self, prefix: &str, field: &str) -> Vec<u64> {
        let mut connection = self.connection().await;
        let days: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{prefix}}}:day:*"))
            .query_async(&mut connection)
            .await
            .expect("day keys");
        let mut counts = Vec::new();
        for day in days {
            let counted: Option<u64> = redis::cmd("HGET")
                .arg(day)
                .arg(field)
                .query_async(&mut connection)
                .await
                .expect("day count");
            counts.push(counted.unwrap_or(0));
        }
        counts
    }

    /// Kills the server with SIGKILL, as a crash would; its files stay
    /// with the [`Crashed`] server, to start it again.
    pub fn crash(&mut self) -> Crashed {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Crashed {
            port: self.port,
            dir: self.dir.take().expect("the server's files"),
            appendonly: self.appendonly,
        }
    }

    /// Stops the server (as a crash would).
    pub fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}
