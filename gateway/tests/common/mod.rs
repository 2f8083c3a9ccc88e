//! Builders for the gateway's end-to-end tests: a recording upstream on a Unix socket,
//! the real `gateway` binary, and real TLS (or plain) HTTP/1.1 clients.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{client::conn::http1::SendRequest, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use taskgate_test_support::{
    eventually::eventually,
    pki::{Ca, CertKey},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader as TokioBufReader},
    net::{TcpSocket, UnixListener},
    sync::Notify,
};

pub const TOKEN_A: &str = "token-aaaaaaaaaaaaaaaaaaaa";
pub const TOKEN_B: &str = "token-bbbbbbbbbbbbbbbbbbbb";

// === upstream ===

/// A tiny HTTP/1.1 server on a Unix socket that records every request head it sees.
pub struct Upstream {
    pub socket: PathBuf,
    pub calls: Arc<AtomicUsize>,
    pub heads: Arc<Mutex<Vec<String>>>,
    /// Each notification releases the next SSE event.
    pub sse_next: Arc<Notify>,
}

impl Upstream {
    pub async fn start(dir: &Path) -> Upstream {
        Self::start_at(&dir.join("worker.sock")).await
    }

    /// The test upstream on the socket `path`.
    pub async fn start_at(path: &Path) -> Upstream {
        let socket = path.to_path_buf();
        let listener = UnixListener::bind(&socket).expect("bind upstream");
        let up = Upstream {
            socket,
            calls: Arc::default(),
            heads: Arc::default(),
            sse_next: Arc::new(Notify::new()),
        };
        let (calls, heads, sse) = (up.calls.clone(), up.heads.clone(), up.sse_next.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (calls, heads, sse) = (calls.clone(), heads.clone(), sse.clone());
                tokio::spawn(async move {
                    let mut io = TokioBufReader::new(stream);
                    loop {
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            match io.read_line(&mut line).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                            let end = line == "\r\n";
                            head.push_str(&line);
                            if end {
                                break;
                            }
                        }
                        calls.fetch_add(1, Ordering::SeqCst);
                        heads.lock().unwrap().push(head.clone());
                        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                        let w = io.get_mut();
                        if path == "/events" {
                            let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n").await;
                            for event in ["data: one\n\n", "data: two\n\n", "data: three\n\n"] {
                                let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                                if w.write_all(chunk.as_bytes()).await.is_err() {
                                    return;
                                }
                                let _ = w.flush().await;
                                sse.notified().await;
                            }
                            let _ = w.write_all(b"0\r\n\r\n").await;
                        } else {
                            let body = format!("upstream saw {path}\n");
                            let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                            if w.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        up
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

// === PKI ===

pub struct Pki {
    pub ca: Ca,
    pub other_ca: Ca,
    pub ca_file: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client: CertKey,
    pub foreign_client: CertKey,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let ca = Ca::new("taskgate test CA");
        let other_ca = Ca::new("some other CA");
        let ca_file = ca.write(dir, "clients-ca");
        let (cert, key) = ca.server(&["localhost", "127.0.0.1"]).write(dir, "server");
        let client = ca.client(&["prometheus.monitoring.svc"]);
        let foreign_client = other_ca.client(&["prometheus.monitoring.svc"]);
        Pki {
            ca,
            other_ca,
            ca_file,
            cert,
            key,
            client,
            foreign_client,
        }
    }
}

// === gateway process ===

pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// True when something listens on `port` (read from /proc, so no connection is made and
/// no audit line is caused by waiting).
pub fn is_listening(port: u16) -> bool {
    let needle = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let c: Vec<&str> = l.split_whitespace().collect();
                c.len() > 3 && c[1].ends_with(&needle) && c[3] == "0A"
            })
        })
    })
}

impl Gateway {
    /// Starts the binary with `args` plus `--listen 127.0.0.1:<free>`, JSON logs and
    /// nothing from the test's environment, and waits until it listens.
    pub async fn start(args: &[String], env: &[(&str, &str)]) -> Gateway {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GATEWAY_LOG_FORMAT", "json")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn gateway");
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut gw = Gateway {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            logs,
        };
        eventually("gateway listening", Duration::from_secs(20), || {
            let up = is_listening(port);
            let exited = gw.child.try_wait().ok().flatten();
            async move {
                if let Some(status) = exited {
                    panic!("gateway exited early: {status}");
                }
                up.then_some(())
            }
        })
        .await;
        let _ = &mut gw;
        gw
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Audit lines (parsed JSON) logged so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "taskgate_gateway::audit")
            .collect()
    }

    pub fn audit_reasons(&self, reason: &str) -> usize {
        self.audit()
            .iter()
            .filter(|v| v["reason"] == reason)
            .count()
    }

    pub fn rss_kb(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Arguments for a plain-HTTP gateway in front of `up`, plus `extra`.
pub fn plaintext_args(up: &Upstream, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--upstream".to_string(),
        format!("unix:{}", up.socket.display()),
        "--insecure-plaintext".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Arguments for a TLS gateway in front of `up` with mTLS and a token file.
pub fn tls_args(pki: &Pki, up: &Upstream, token_file: &Path) -> Vec<String> {
    vec![
        "--upstream".into(),
        format!("unix:{}", up.socket.display()),
        "--tls-cert".into(),
        pki.cert.display().to_string(),
        "--tls-key".into(),
        pki.key.display().to_string(),
        "--tls-client-ca".into(),
        pki.ca_file.display().to_string(),
        "--auth-token-file".into(),
        token_file.display().to_string(),
        "--reload-poll".into(),
        "200ms".into(),
    ]
}

// === clients ===

/// An HTTP/1.1 client over TLS (optionally with a client certificate) or plain TCP,
/// from an optional source address.
#[derive(Clone)]
pub struct Client {
    tls: Option<Arc<rustls::ClientConfig>>,
    pub source: Option<IpAddr>,
}

pub type Conn = SendRequest<Empty<Bytes>>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Client {
    pub fn plain() -> Client {
        Client {
            tls: None,
            source: None,
        }
    }

    /// Trusts `ca`; presents `cert` when given.
    pub fn tls(ca: &Ca, cert: Option<&CertKey>) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let b = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let cfg = match cert {
            Some(ck) => b
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(ck.cert_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(ck.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        Client {
            tls: Some(Arc::new(cfg)),
            source: None,
        }
    }

    pub fn from(mut self, ip: &str) -> Client {
        self.source = Some(ip.parse().unwrap());
        self
    }

    pub async fn tcp(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let sock = TcpSocket::new_v4()?;
        if let Some(src) = self.source {
            sock.bind(SocketAddr::new(src, 0))?;
        }
        sock.connect(addr).await
    }

    /// Opens a keep-alive connection (TCP, TLS if configured, HTTP/1.1).
    pub async fn connect(&self, addr: SocketAddr) -> Result<Conn, String> {
        let tcp = self.tcp(addr).await.map_err(|e| format!("connect: {e}"))?;
        match &self.tls {
            Some(cfg) => {
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                    .map_err(|e| format!("tls: {e}"))?;
                http1(tls).await
            }
            None => http1(tcp).await,
        }
    }

    /// One request on a fresh connection.
    pub async fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
    ) -> Result<(u16, String), String> {
        let mut conn = self.connect(addr).await?;
        send(&mut conn, path, token).await
    }
}

pub async fn http1<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    io: S,
) -> Result<Conn, String> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

pub fn request(path: &str, token: Option<&str>) -> Request<Empty<Bytes>> {
    let mut b = Request::get(path).header("host", "localhost");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Empty::new()).unwrap()
}

/// Sends a GET on an open connection and reads the whole answer.
pub async fn send(
    conn: &mut Conn,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    conn.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let resp = conn
        .send_request(request(path, token))
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub fn write_tokens(path: &Path, tokens: &[&str]) {
    let text = format!("# rotated tokens\n{}\n", tokens.join("\n"));
    // Write then rename, as an operator's tooling would, so a reload never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl Gateway {
    /// Waits until `n` audit lines with `reason` were logged (log lines travel through a
    /// pipe, so they arrive a little after the response), then returns the exact count.
    pub async fn wait_audit(&self, reason: &str, n: usize) -> usize {
        eventually(
            &format!("{n} audit lines with reason {reason}"),
            Duration::from_secs(10),
            || {
                let have = self.audit_reasons(reason);
                async move { (have >= n).then_some(have) }
            },
        )
        .await
    }

    /// Waits until a log line contains `text`.
    pub async fn wait_log(&self, text: &str) {
        eventually(
            &format!("log line containing {text:?}"),
            Duration::from_secs(10),
            || {
                let found = self.logs().iter().any(|l| l.contains(text));
                async move { found.then_some(()) }
            },
        )
        .await
    }
}
