//! Fixture servers on loopback: an axum router served over real HTTPS (a certificate from a
//! [`TestCa`](crate::TestCa)) or plain HTTP, in the test's own runtime, until dropped.
use std::{net::SocketAddr, sync::Arc};

use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::{TlsAcceptor, rustls};

use crate::ServerCert;

/// A running fixture server; stops when dropped.
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
    serve(router, Some(TlsAcceptor::from(Arc::new(config)))).await
}

/// Serves `router` over plain HTTP on 127.0.0.1 and a free port.
///
/// # Panics
/// If the port cannot be bound.
pub async fn serve_http(router: axum::Router) -> FixtureServer {
    serve(router, None).await
}

async fn serve(router: axum::Router, tls: Option<TlsAcceptor>) -> FixtureServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let address = listener.local_addr().expect("local address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (router, tls) = (router.clone(), tls.clone());
            tokio::spawn(async move {
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
