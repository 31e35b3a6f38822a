//! The pod port-forward subresource as the kubelet serves it: a WebSocket
//! with the `v4.channel.k8s.io` subprotocol (a data and an error channel per
//! port, each opened by its port number), bridged to a TCP connection made
//! inside the pod's network namespace.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use nix::sched::{CloneFlags, setns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::select::query_param;
use super::server::{Target, bad_request, not_found};
use super::{Body, PORTFORWARD_PROTOCOL, Shared};

pub(super) async fn port_forward(
    shared: &Arc<Shared>,
    target: &Target,
    query: &str,
    req: &mut Request<Incoming>,
) -> Response<Body> {
    let name = target.name.clone().unwrap_or_default();
    let ns = target.namespace.clone().unwrap_or_default();
    let Some(pod) = shared.lock().get("pods", &ns, &name).cloned() else {
        return not_found(target.kind, &name);
    };
    if pod["status"]["phase"] != "Running" {
        return bad_request(&format!(
            "unable to upgrade connection: pod {name} is not running"
        ));
    }
    let ports: Result<Vec<u16>, _> = query_param(query, "ports")
        .unwrap_or_default()
        .split(',')
        .map(|p| p.trim().parse::<u16>())
        .collect();
    let ports = match ports {
        Ok(ports) if !ports.is_empty() && !ports.contains(&0) => ports,
        _ => return bad_request("ports: invalid or missing port numbers"),
    };
    let offered = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !offered.split(',').any(|p| p.trim() == PORTFORWARD_PROTOCOL) {
        return bad_request(&format!(
            "unable to upgrade connection: none of the offered subprotocols ({offered:?}) is \
             supported; this server speaks {PORTFORWARD_PROTOCOL}"
        ));
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return bad_request("missing Sec-WebSocket-Key");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    // Each pod of the Deployment has its own network namespace (its bed's
    // target namespace); the other pods (agent pods the fake kubelet runs)
    // share the first bed's target namespace, as the cluster network.
    let netns = Some(
        shared
            .target_pod(&name)
            .unwrap_or(&shared.pods[0])
            .netns
            .clone(),
    );
    let upgrade = hyper::upgrade::on(req);
    let shared = shared.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        shared.forwards_open.fetch_add(1, Ordering::SeqCst);
        serve_forward(&shared, ws, &ports, netns, &name).await;
        shared.forwards_open.fetch_sub(1, Ordering::SeqCst);
    });
    let mut response = Response::new(Empty::new().boxed_unsync());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(PORTFORWARD_PROTOCOL),
    );
    response
}

/// Connects to 127.0.0.1:`port` inside the network namespace `netns`, from a
/// thread of its own (so no pooled thread is left in that namespace).
pub(super) fn connect_in_netns(netns: PathBuf, port: u16) -> std::io::Result<std::net::TcpStream> {
    std::thread::spawn(move || {
        let file = File::open(&netns)?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let stream = std::net::TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Duration::from_secs(5),
        )?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the connecting thread panicked")))
}

/// The kubelet's side of a port-forward: for port `i`, channel `2i` carries
/// data and `2i+1` errors; each starts with the port number (2 bytes, little
/// endian).
pub(super) async fn serve_forward<S>(
    shared: &Shared,
    ws: WebSocketStream<S>,
    ports: &[u16],
    netns: Option<PathBuf>,
    pod: &str,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut cut = shared.cut.subscribe();
    cut.mark_unchanged();
    let (mut sink, mut stream) = ws.split();
    for (i, port) in ports.iter().enumerate() {
        let [lo, hi] = port.to_le_bytes();
        let data = (2 * i) as u8;
        for channel in [data, data + 1] {
            if sink
                .send(Message::binary(vec![channel, lo, hi]))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let (from_pod_tx, mut from_pod) = mpsc::channel::<(u8, Option<Bytes>)>(16);
    let mut writers: Vec<Option<tokio::net::tcp::OwnedWriteHalf>> = Vec::new();
    let mut open = 0usize;
    for (i, port) in ports.iter().enumerate() {
        let connected = match &netns {
            Some(netns) => {
                let netns = netns.clone();
                let port = *port;
                tokio::task::spawn_blocking(move || connect_in_netns(netns, port))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                    .and_then(tokio::net::TcpStream::from_std)
            }
            None => Err(std::io::Error::other(
                "this pod has no network namespace in the fake cluster",
            )),
        };
        let data = (2 * i) as u8;
        match connected {
            Ok(tcp) => {
                let (mut read, write) = tcp.into_split();
                writers.push(Some(write));
                open += 1;
                let tx = from_pod_tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match read.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                let _ = tx.send((data, None)).await;
                                return;
                            }
                            Ok(n) => {
                                if tx
                                    .send((data, Some(Bytes::copy_from_slice(&buf[..n]))))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
            Err(e) => {
                writers.push(None);
                let mut frame = vec![data + 1];
                frame.extend_from_slice(
                    format!(
                        "error forwarding port {port} to pod {pod}, uid : failed to connect to \
                         localhost:{port} inside namespace: {e}"
                    )
                    .as_bytes(),
                );
                let _ = sink.send(Message::binary(frame)).await;
            }
        }
    }
    drop(from_pod_tx);
    if open == 0 {
        let _ = sink.send(Message::Close(None)).await;
        return;
    }
    loop {
        tokio::select! {
            _ = cut.changed() => return, // dropped without a close frame
            message = stream.next() => match message {
                Some(Ok(Message::Binary(bytes))) if bytes.len() > 1 => {
                    let channel = usize::from(bytes[0]);
                    if channel % 2 == 0
                        && let Some(Some(writer)) = writers.get_mut(channel / 2)
                        && writer.write_all(&bytes[1..]).await.is_err()
                    {
                        writers[channel / 2] = None;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            event = from_pod.recv() => match event {
                Some((channel, Some(bytes))) => {
                    let mut frame = Vec::with_capacity(bytes.len() + 1);
                    frame.push(channel);
                    frame.extend_from_slice(&bytes);
                    if sink.send(Message::binary(frame)).await.is_err() {
                        return;
                    }
                }
                Some((_, None)) => {
                    open -= 1;
                    if open == 0 {
                        let _ = sink.send(Message::Close(None)).await;
                        return;
                    }
                }
                None => return,
            },
        }
    }
}
