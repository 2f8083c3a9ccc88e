//! `gwbench`: the load that `wrk` cannot make, for `tests/bench/gateway`.
//!
//! wrk sends every request from 127.0.0.1; the per-host limiter figures need many source
//! addresses. This client binds each connection to its own loopback address
//! (127.1.0.1, 127.1.0.2, …; all of 127/8 reaches `lo` on Linux) and speaks just enough
//! HTTP/1.1 (GET, `Content-Length` bodies) over TLS or plain TCP:
//!
//! - `fill`: one unauthorized request from each of `--hosts` addresses, `--conc` at a
//!   time; fills a limiter table (gateway, nginx `limit_req` zone, HAProxy stick-table).
//! - `flood`: `--conns` keep-alive connections sending unauthorized requests for `--secs`
//!   seconds; a connection the server closes (or that has sent `--per-conn` requests) is
//!   reopened from the next address, so the flood comes from ever more hosts; `--rate`
//!   paces it to that many requests per second in all. Prints the answers by status.
//! - `idle`: `--conns` connections that each make one authorized request and then stay
//!   open and idle; prints `ready` and holds them until standard input closes.
//!
//! Bench tool only: it trusts the certificate given by `--ca` for `127.0.0.1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpSocket,
};

#[derive(Parser, Debug)]
struct Args {
    /// fill | flood | idle
    mode: String,
    /// Server address, e.g. 127.0.0.1:9443.
    addr: SocketAddr,
    /// Speak TLS, trusting this PEM certificate (plain TCP without it).
    #[arg(long)]
    ca: Option<String>,
    /// Request path.
    #[arg(long, default_value = "/metrics")]
    path: String,
    /// Bearer token for `idle` (the other modes send none).
    #[arg(long)]
    token: Option<String>,
    /// Distinct source addresses for `fill`.
    #[arg(long, default_value_t = 10_000)]
    hosts: u32,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    conns: u32,
    /// Seconds for `flood`.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// `flood`: requests per connection before it is reopened from a fresh address
    /// (0: only when the server closes it).
    #[arg(long, default_value_t = 0)]
    per_conn: u64,
    /// `flood`: total requests per second over all connections (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Index of the first source address (so two runs can use disjoint hosts).
    #[arg(long, default_value_t = 0)]
    first_host: u32,
}

/// The `i`th source address: 127.1.0.1 onwards, skipping .0 and .255 in the last octet.
fn source(i: u32) -> IpAddr {
    let last = 1 + i % 254;
    let rest = i / 254;
    let third = rest % 256;
    let second = 1 + (rest / 256) % 254;
    IpAddr::V4(Ipv4Addr::new(127, second as u8, third as u8, last as u8))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Dialer {
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Dialer {
    async fn dial(&self, host: u32) -> Result<Box<dyn Io>> {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(source(host), 0))
            .with_context(|| format!("bind {}", source(host)))?;
        let tcp = sock.connect(self.addr).await.context("connect")?;
        tcp.set_nodelay(true)?;
        Ok(match &self.tls {
            Some(c) => {
                let name = ServerName::IpAddress(self.addr.ip().into());
                Box::new(c.connect(name, tcp).await.context("tls handshake")?)
            }
            None => Box::new(tcp),
        })
    }
}

/// Reads one response; returns its status and whether the server will close.
async fn read_response(io: &mut dyn Io, buf: &mut Vec<u8>) -> Result<(u16, bool)> {
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before a response");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head")?;
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let mut len = 0usize;
    let mut close = false;
    for line in head.lines().skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            len = v.parse().context("content-length")?;
        } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    let mut have = buf.len() - head_end;
    while have < len {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed inside a body");
        }
        have += n;
    }
    Ok((status, close))
}

fn request(args: &Args, token: Option<&str>) -> Vec<u8> {
    let mut r = format!("GET {} HTTP/1.1\r\nHost: localhost\r\n", args.path);
    if let Some(t) = token {
        r.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

#[derive(Default)]
struct Tally {
    by_status: Mutex<BTreeMap<u16, u64>>,
    errors: AtomicU64,
    connections: AtomicU64,
}

impl Tally {
    fn count(&self, status: u16) {
        *self.by_status.lock().unwrap().entry(status).or_default() += 1;
    }

    fn summary(&self) -> String {
        let m = self.by_status.lock().unwrap();
        let parts: Vec<String> = m.iter().map(|(s, n)| format!("{s}={n}")).collect();
        format!(
            "{} connections={} errors={}",
            parts.join(" "),
            self.connections.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed)
        )
    }
}

/// This process's CPU time so far (user + system), from /proc: the share of the machine the
/// flood itself takes from every system under test.
fn own_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line, 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let tls = match &args.ca {
        Some(path) => {
            let pem = std::fs::read(path).with_context(|| format!("--ca {path}"))?;
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from_pem_slice(&pem).context("--ca: no certificate")?)?;
            let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
        }
        None => None,
    };
    let dialer = Arc::new(Dialer {
        addr: args.addr,
        tls,
    });
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    match args.mode.as_str() {
        "fill" => {
            let next = Arc::new(AtomicU64::new(0));
            let req = Arc::new(request(&args, None));
            let mut tasks = Vec::new();
            for _ in 0..args.conns {
                let (dialer, tally, next, req, args) = (
                    dialer.clone(),
                    tally.clone(),
                    next.clone(),
                    req.clone(),
                    args.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= u64::from(args.hosts) {
                            break;
                        }
                        let host = args.first_host + i as u32;
                        let r = async {
                            let mut io = dialer.dial(host).await?;
                            io.write_all(&req).await?;
                            read_response(&mut *io, &mut buf).await
                        }
                        .await;
                        tally.connections.fetch_add(1, Ordering::Relaxed);
                        match r {
                            Ok((s, _)) => tally.count(s),
                            Err(_) => {
                                tally.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
            for t in tasks {
                t.await?;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "fill hosts={} secs={secs:.2} {}",
                args.hosts,
                tally.summary()
            );
        }
        "flood" => {
            let next = Arc::new(AtomicU64::new(u64::from(args.first_host)));
            let req = Arc::new(request(&args, None));
            let deadline = start + Duration::from_secs(args.secs);
            let mut tasks = Vec::new();
            for _ in 0..args.conns {
                let (dialer, tally, next, req, per_conn) = (
                    dialer.clone(),
                    tally.clone(),
                    next.clone(),
                    req.clone(),
                    args.per_conn,
                );
                let mut pace = (args.rate > 0).then(|| {
                    let mut i = tokio::time::interval(Duration::from_secs_f64(
                        f64::from(args.conns) / args.rate as f64,
                    ));
                    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    i
                });
                tasks.push(tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while Instant::now() < deadline {
                        let host = next.fetch_add(1, Ordering::Relaxed) as u32;
                        tally.connections.fetch_add(1, Ordering::Relaxed);
                        let mut io = match dialer.dial(host).await {
                            Ok(io) => io,
                            Err(_) => {
                                tally.errors.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        };
                        let mut sent = 0u64;
                        while Instant::now() < deadline && (per_conn == 0 || sent < per_conn) {
                            sent += 1;
                            if let Some(p) = pace.as_mut() {
                                p.tick().await;
                            }
                            if io.write_all(&req).await.is_err() {
                                break;
                            }
                            match read_response(&mut *io, &mut buf).await {
                                Ok((s, close)) => {
                                    tally.count(s);
                                    if close {
                                        break;
                                    }
                                }
                                Err(_) => break,
                            }
                        }
                    }
                }));
            }
            for t in tasks {
                t.await?;
            }
            let secs = start.elapsed().as_secs_f64();
            let total: u64 = tally.by_status.lock().unwrap().values().sum();
            println!(
                "flood secs={secs:.2} answers_per_s={:.0} {} client_cpu_s={:.2}",
                total as f64 / secs,
                tally.summary(),
                own_cpu_secs()
            );
        }
        "idle" => {
            let req = request(&args, args.token.as_deref());
            let mut held = Vec::with_capacity(args.conns as usize);
            // Opened a batch at a time so the listener's backlog is never overrun.
            let mut i = 0u32;
            while i < args.conns {
                let batch = (args.conns - i).min(256);
                let mut set = tokio::task::JoinSet::new();
                for k in 0..batch {
                    let (dialer, req) = (dialer.clone(), req.clone());
                    let host = args.first_host + i + k;
                    set.spawn(async move {
                        let mut io = dialer.dial(host).await?;
                        io.write_all(&req).await?;
                        let mut b = Vec::new();
                        let (s, _) = read_response(&mut *io, &mut b).await?;
                        anyhow::ensure!(s == 200, "idle connection got {s}");
                        Ok::<_, anyhow::Error>(io)
                    });
                }
                while let Some(r) = set.join_next().await {
                    held.push(r??);
                }
                i += batch;
            }
            println!(
                "ready conns={} secs={:.2}",
                held.len(),
                start.elapsed().as_secs_f64()
            );
            let mut stdin = tokio::io::stdin();
            let mut sink = [0u8; 64];
            while stdin.read(&mut sink).await.unwrap_or(0) > 0 {}
            drop(held);
        }
        other => bail!("unknown mode {other:?}: use fill, flood or idle"),
    }
    Ok(())
}
