//! UDP through the stack: each (program address, remote address) pair is a flow
//! with its own upstream socket (a connected UDP socket in the target), opened on
//! the pair's first datagram and closed after [`crate::NetstackOptions::udp_idle`]
//! without traffic either way. Datagrams to the resolver's port 53 are answered by
//! graft's resolver instead.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use futures::{SinkExt, StreamExt};
use netstack_smoltcp::udp::{ReadHalf, WriteHalf};
use tokio::{sync::mpsc, task::JoinSet};

use crate::{Shared, dns::Resolver, upstream::UDP_QUEUE};

/// Flows kept at once; past this the idle ones are swept before a new one opens.
const SWEEP_AT: usize = 4096;
/// Datagrams to the program queued before new ones are dropped.
const TO_PROGRAM_QUEUE: usize = 1024;

/// A datagram: payload, source, destination.
type Datagram = (Vec<u8>, SocketAddr, SocketAddr);

/// Runs UDP until the stack ends; flows and answers end when this is dropped.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    resolver: Arc<Resolver>,
    mut from_program: ReadHalf,
    mut to_program: WriteHalf,
) {
    let (to_program_tx, mut to_program_rx) = mpsc::channel::<Datagram>(TO_PROGRAM_QUEUE);
    let writer = async move {
        while let Some(datagram) = to_program_rx.recv().await {
            if to_program.send(datagram).await.is_err() {
                break;
            }
        }
    };
    let mut flows: HashMap<(SocketAddr, SocketAddr), mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let reader = async {
        while let Some((payload, program, remote)) = from_program.next().await {
            if shared.is_dns(remote) {
                let resolver = resolver.clone();
                let reply = to_program_tx.clone();
                tasks.spawn(async move {
                    if let Some(answer) = resolver.answer_udp(&payload).await {
                        let _ = reply.send((answer, remote, program)).await;
                    }
                });
                continue;
            }
            if shared.is_dns_address(remote.ip()) {
                continue;
            }
            let key = (program, remote);
            let payload = match flows.get(&key) {
                Some(flow) => match flow.try_send(payload) {
                    Ok(()) => continue,
                    // The queue is full: drop, as a full socket buffer would.
                    Err(mpsc::error::TrySendError::Full(_)) => continue,
                    Err(mpsc::error::TrySendError::Closed(payload)) => payload,
                },
                None => payload,
            };
            if flows.len() >= SWEEP_AT {
                flows.retain(|_, f| !f.is_closed());
                if flows.len() >= SWEEP_AT {
                    continue;
                }
            }
            let (tx, rx) = mpsc::channel(UDP_QUEUE);
            let _ = tx.try_send(payload);
            flows.insert(key, tx);
            tasks.spawn(flow(
                shared.clone(),
                program,
                remote,
                rx,
                to_program_tx.clone(),
            ));
            while tasks.try_join_next().is_some() {}
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
}

/// One flow: opens the upstream socket, then moves datagrams both ways until it
/// idles out or either side ends.
async fn flow(
    shared: Arc<Shared>,
    program: SocketAddr,
    remote: SocketAddr,
    mut from_program: mpsc::Receiver<Vec<u8>>,
    to_program: mpsc::Sender<Datagram>,
) {
    let upstream = shared.upstream_for(&remote, graft_protocol::Transport::Udp);
    let mut relay = match upstream.connect_udp(remote).await {
        Ok(relay) => relay,
        Err(e) => {
            tracing::debug!(%program, %remote, error = %e, "UDP flow refused");
            return;
        }
    };
    loop {
        tokio::select! {
            datagram = from_program.recv() => match datagram {
                Some(d) => if relay.to_remote.send(d).await.is_err() { break },
                None => break,
            },
            datagram = relay.from_remote.recv() => match datagram {
                Some(d) => if to_program.send((d, remote, program)).await.is_err() { break },
                None => break,
            },
            () = tokio::time::sleep(shared.options.udp_idle) => break,
        }
    }
}
