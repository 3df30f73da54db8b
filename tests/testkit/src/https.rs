//! Fixture servers on loopback: an axum router served over real HTTPS (a certificate from a
//! [`TestCa`](crate::TestCa)) or plain HTTP, in the test's own runtime, until dropped.
//! Dropping one closes its listener and every connection it accepted (kept-alive ones and open
//! event streams included), so clients then find the port refusing connections.
use std::{net::SocketAddr, sync::Arc};

use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::{TlsAcceptor, rustls};

use crate::ServerCert;

/// A running fixture server; stops when dropped (see [`FixtureServer::shutdown`] to wait for
/// the port to be free).
#[derive(Debug)]
pub struct FixtureServer {
    pub address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FixtureServer {
    /// `https://<host>:<port>` for a host name the test's resolver maps to loopback (and the
    /// certificate names).
    #[must_use]
    pub fn https_url(&self, host: &str) -> String {
        format!("https://{host}:{}", self.address.port())
    }

    #[must_use]
    pub fn port(&self) -> u16 {
        self.address.port()
    }
}

impl FixtureServer {
    /// Stops the server and waits until its listener and connections are closed, so the port
    /// refuses connections (and can be bound again, e.g. by [`serve_https_on`]).
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for FixtureServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `router` over HTTPS with `cert` on 127.0.0.1 and a free port.
///
/// # Panics
/// If the port cannot be bound or the certificate is unusable.
pub async fn serve_https(router: axum::Router, cert: &ServerCert) -> FixtureServer {
    serve_https_on(router, cert, 0).await
}

/// Serves `router` over HTTPS with `cert` on `127.0.0.1:port` (0: a free port), e.g. to bring
/// a stopped server back on the port its clients know.
///
/// # Panics
/// If the port cannot be bound or the certificate is unusable.
pub async fn serve_https_on(router: axum::Router, cert: &ServerCert, port: u16) -> FixtureServer {
    let certs = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key PEM");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server certificate");
    serve(router, Some(TlsAcceptor::from(Arc::new(config))), port).await
}

/// Serves `router` over plain HTTP on 127.0.0.1 and a free port.
///
/// # Panics
/// If the port cannot be bound.
pub async fn serve_http(router: axum::Router) -> FixtureServer {
    serve(router, None, 0).await
}

async fn serve(router: axum::Router, tls: Option<TlsAcceptor>, port: u16) -> FixtureServer {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind a loopback port");
    let address = listener.local_addr().expect("local address");
    let task = tokio::spawn(async move {
        // The connections live in this set, so aborting the accept loop closes them too.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            while connections.try_join_next().is_some() {}
            let _ = stream.set_nodelay(true);
            let (router, tls) = (router.clone(), tls.clone());
            connections.spawn(async move {
                let service = TowerToHyperService::new(router);
                let builder = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    FixtureServer { address, task }
}
