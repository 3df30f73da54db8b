//! The testkit against a real nats-server: readiness, crash, restart on the same port and store.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use testkit::{NatsServer, shared_nats, unique_name};

/// The first line a client connecting to `port` receives: the server's INFO.
fn info_line(port: u16) -> std::io::Result<String> {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line)
}

fn assert_jetstream_info(port: u16) {
    let info = info_line(port).expect("the server accepts a client connection");
    assert!(info.starts_with("INFO {"), "not an INFO greeting: {info}");
    assert!(
        info.contains("\"jetstream\":true"),
        "JetStream is not enabled: {info}"
    );
}

/// One request-reply over the raw NATS protocol (enough for the JetStream API): the reply payload.
fn request(port: u16, subject: &str, payload: &str) -> String {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    write!(
        writer,
        "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB _INBOX.testkit 1\r\n\
         PUB {subject} _INBOX.testkit {}\r\n{payload}\r\n",
        payload.len()
    )
    .expect("send request");
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("read from server");
        if line.starts_with("PING") {
            writer.write_all(b"PONG\r\n").expect("send PONG");
        } else if line.starts_with("MSG ") {
            let len: usize = line
                .split_whitespace()
                .last()
                .and_then(|n| n.parse().ok())
                .expect("MSG line ends with the payload size");
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body).expect("read reply payload");
            body.truncate(len);
            return String::from_utf8(body).expect("UTF-8 reply");
        } else {
            assert!(!line.starts_with("-ERR"), "server error: {line}");
        }
    }
}

#[test]
fn started_server_greets_clients_with_jetstream_enabled() {
    let server = NatsServer::start();
    assert!(server.is_running());
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    assert!(server.store_dir().is_dir());
    assert_jetstream_info(server.port());
}

#[test]
fn killed_server_refuses_connections_and_restarts_on_the_same_port_and_store() {
    let mut server = NatsServer::start();
    let port = server.port();
    let store = server.store_dir().to_path_buf();
    assert_jetstream_info(port);
    assert!(
        store.join("jetstream").is_dir(),
        "JetStream keeps its state under the store dir"
    );

    server.kill();
    assert!(!server.is_running());
    let refused = info_line(port).expect_err("a killed server accepts no connection");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");

    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert_eq!(server.store_dir(), store);
    assert!(store.join("jetstream").is_dir());
    assert_jetstream_info(port);
}

#[test]
fn restarted_server_recovers_its_streams_from_the_store() {
    let mut server = NatsServer::start();
    let stream = unique_name("recover");
    let created = request(
        server.port(),
        &format!("$JS.API.STREAM.CREATE.{stream}"),
        &format!("{{\"name\":\"{stream}\",\"subjects\":[\"{stream}.>\"],\"storage\":\"file\"}}"),
    );
    assert!(!created.contains("\"error\""), "{created}");

    server.kill();
    server.restart();

    // Ready means JetStream has recovered: no waiting for the stream to come back.
    let info = request(server.port(), &format!("$JS.API.STREAM.INFO.{stream}"), "");
    assert!(!info.contains("\"error\""), "{info}");
    assert!(info.contains(&format!("\"name\":\"{stream}\"")), "{info}");
}

#[test]
fn restart_waits_for_a_port_that_is_briefly_busy() {
    let mut server = NatsServer::start();
    let port = server.port();
    server.kill();
    let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("take the port");
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(squatter);
    });

    server.restart();
    release.join().expect("release thread");
    assert_eq!(server.port(), port);
    assert_jetstream_info(port);
}

#[test]
fn stopped_server_refuses_connections_and_restarts() {
    let mut server = NatsServer::start();
    let port = server.port();

    server.stop();
    assert!(!server.is_running());
    assert!(info_line(port).is_err());

    server.restart();
    assert_jetstream_info(port);
}

#[test]
fn dropped_server_removes_its_store() {
    let server = NatsServer::start();
    let store = server.store_dir().to_path_buf();
    assert!(store.is_dir());
    drop(server);
    assert!(!store.exists());
}

#[test]
fn shared_server_is_started_once() {
    let first = shared_nats();
    let second = shared_nats();
    assert!(std::ptr::eq(first, second));
    assert!(first.is_running());
    assert_jetstream_info(first.port());
}

#[test]
fn unique_names_are_distinct_and_valid_nats_names() {
    let names: Vec<String> = (0..1000).map(|_| unique_name("t")).collect();
    let distinct: HashSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), names.len());
    for name in &names {
        assert!(name.starts_with('t'));
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{name}"
        );
    }
    assert_ne!(unique_name("stream-"), unique_name("stream-"));
}
