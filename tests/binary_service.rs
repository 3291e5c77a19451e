//! The documented pattern for a binary-only service (`finale::testing::Process`): the
//! `axum_service` example, which has no library target, started as a child process on a free
//! port, driven over the network and stopped with a real SIGTERM.

#![cfg(unix)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use finale::Signal;
use finale::testing::Process;

fn get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn sigterm_drains_and_exits_clean() {
    let mut command = Command::new(common::examples::example("axum_service"));
    command
        .env("AXUM_SERVICE_ADDR", "localhost:0")
        .env("RUST_LOG", "info");
    let mut service = Process::spawn(command).unwrap();
    // The service logs the address it bound: the port the kernel chose.
    let line = service.wait_for("listening on ", Duration::from_secs(60));
    let addr = line
        .rsplit("listening on ")
        .next()
        .unwrap()
        .trim()
        .to_owned();
    assert!(get(&addr, "/hello").ends_with("hello\n"), "{addr}");
    assert!(get(&addr, "/readyz").starts_with("HTTP/1.1 200"));
    service.signal(Signal::Terminate);
    let exit = service.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "{}", exit.output());
    assert!(
        exit.report()
            .starts_with("finale: shutdown after signal SIGTERM: clean, exit code 0"),
        "{}",
        exit.output()
    );
}

#[test]
fn a_port_in_use_exits_with_the_startup_failure_code() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut command = Command::new(common::examples::example("axum_service"));
    command.env("AXUM_SERVICE_ADDR", &addr);
    let exit = Process::spawn(command)
        .unwrap()
        .wait_exit(Duration::from_secs(60));
    assert_eq!(exit.code(), Some(3), "{}", exit.output());
    assert!(
        exit.report()
            .contains(&format!("server \"http\" cannot listen on {addr}")),
        "{}",
        exit.output()
    );
}
