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

fn args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        listen: "127.0.0.1:9444".parse().unwrap(),
        upstream: PathBuf::new(),
        cert: PathBuf::new(),
        key: PathBuf::new(),
        token: String::new(),
        threads: 2,
    };
    while let Some(flag) = it.next() {
        let v = it.next().expect("every flag takes a value");
        match flag.as_str() {
            "--listen" => a.listen = v.parse().expect("--listen IP:PORT"),
            "--upstream" => a.upstream = v.into(),
            "--cert" => a.cert = v.into(),
            "--key" => a.key = v.into(),
            "--token" => a.token = v,
            "--threads" => a.threads = v.parse().expect("--threads N"),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn main() {
    let a = Arc::new(args());
    if std::env::var_os("PROBE_PER_CORE").is_none() {
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.threads)
            .enable_all()
            .build()
            .unwrap()
            .block_on(serve(a));
    }
    // nginx's model: one single-threaded event loop per core, each with its own
    // SO_REUSEPORT listener, so a connection never changes threads.
    let threads: Vec<_> = (0..a.threads)
        .map(|_| {
            let a = a.clone();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(serve(a))
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

async fn serve(a: Arc<Args>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&a.cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&a.key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let expected: Arc<[u8]> = format!("Bearer {}", a.token).into_bytes().into();
    let upstream: Arc<PathBuf> = Arc::new(a.upstream.clone());
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(a.listen).unwrap();
    let listener = socket.listen(1024).unwrap();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, expected, upstream) = (acceptor.clone(), expected.clone(), upstream.clone());
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
    let sender = slot.as_mut().expect("set above");
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
