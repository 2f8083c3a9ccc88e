//! A measuring probe, not a product: how fast can a plain tokio + rustls + hyper proxy do
//! the gateway's authorized hot path on this machine (TLS, bearer check, Unix-socket
//! upstream, each downstream connection paired with one upstream connection)? It has none
//! of the gateway's other controls. Used to decide whether replacing pingora's proxy loop
//! could reach nginx; see `docs/gateway.md`, "Where pingora is the ceiling".
//!
//! ```sh
//! hyper_ceiling --listen 127.0.0.1:9444 --upstream /tmp/up.sock --cert c.pem --key k.pem \
//!     --token TOKEN --threads 2
//! ```

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{
    body::Incoming, client::conn::http1::SendRequest, header::AUTHORIZATION, Request, Response,
    StatusCode,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::{net::UnixStream, sync::Mutex};

type Body = Either<Incoming, Full<Bytes>>;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    listen: SocketAddr,
    upstream: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    token: String,
    threads: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 9444)),
        upstream: PathBuf::new(),
        cert: PathBuf::new(),
        key: PathBuf::new(),
        token: String::new(),
        threads: 2,
    };
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => a.listen = v.parse().context("--listen takes IP:PORT")?,
            "--upstream" => a.upstream = v.into(),
            "--cert" => a.cert = v.into(),
            "--key" => a.key = v.into(),
            "--token" => a.token = v,
            "--threads" => a.threads = v.parse().context("--threads takes a number")?,
            other => anyhow::bail!(
                "unknown flag {other}; use --listen, --upstream, --cert, --key, --token, --threads"
            ),
        }
    }
    Ok(a)
}

/// What every connection shares, built once at start-up.
struct Shared {
    listen: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    expected: Arc<[u8]>,
    upstream: Arc<PathBuf>,
}

fn shared(a: Args) -> anyhow::Result<Shared> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&a.cert)
        .and_then(|certs| certs.collect())
        .with_context(|| format!("cannot read certificates from {}", a.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&a.key)
        .with_context(|| format!("cannot read a private key from {}", a.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Shared {
        listen: a.listen,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        expected: format!("Bearer {}", a.token).into_bytes().into(),
        upstream: Arc::new(a.upstream),
    })
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let threads = a.threads;
    let shared = Arc::new(shared(a)?);
    if std::env::var_os("PROBE_PER_CORE").is_none() {
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
            .block_on(serve(shared));
    }
    // nginx's model: one single-threaded event loop per core, each with its own
    // SO_REUSEPORT listener, so a connection never changes threads.
    let loops: Vec<_> = (0..threads)
        .map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(serve(shared))
            })
        })
        .collect();
    for l in loops {
        l.join()
            .map_err(|_| anyhow::anyhow!("an event loop panicked"))??;
    }
    Ok(())
}

async fn serve(shared: Arc<Shared>) -> anyhow::Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseport(true)?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(shared.listen)
        .with_context(|| format!("cannot bind {}", shared.listen))?;
    let listener = socket.listen(1024)?;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, expected, upstream) = (
            shared.acceptor.clone(),
            shared.expected.clone(),
            shared.upstream.clone(),
        );
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let pair: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (expected, upstream, pair) = (expected.clone(), upstream.clone(), pair.clone());
                async move { Ok::<_, Infallible>(handle(req, &expected, &upstream, &pair).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn fixed(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *r.status_mut() = status;
    r
}

async fn handle(
    mut req: Request<Incoming>,
    expected: &[u8],
    upstream: &PathBuf,
    pair: &Mutex<Option<SendRequest<Incoming>>>,
) -> Response<Body> {
    if req.uri().path() != "/metrics" && req.uri().path() != "/big" {
        return fixed(StatusCode::NOT_FOUND, "not found\n");
    }
    let ok = req
        .headers()
        .get(AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected);
    if !ok {
        return fixed(StatusCode::UNAUTHORIZED, "unauthorized\n");
    }
    req.headers_mut().remove(AUTHORIZATION);
    let mut slot = pair.lock().await;
    if slot.as_ref().is_none_or(|s| s.is_closed()) {
        let Ok(unix) = UnixStream::connect(upstream).await else {
            return fixed(StatusCode::BAD_GATEWAY, "bad gateway\n");
        };
        let Ok((sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(unix)).await
        else {
            return fixed(StatusCode::BAD_GATEWAY, "bad gateway\n");
        };
        tokio::spawn(conn);
        *slot = Some(sender);
    }
    let Some(sender) = slot.as_mut() else {
        return fixed(StatusCode::BAD_GATEWAY, "bad gateway\n");
    };
    if sender.ready().await.is_err() {
        *slot = None;
        return fixed(StatusCode::BAD_GATEWAY, "bad gateway\n");
    }
    match sender.send_request(req).await {
        Ok(resp) => resp.map(Either::Left),
        Err(_) => {
            *slot = None;
            fixed(StatusCode::BAD_GATEWAY, "bad gateway\n")
        }
    }
}
