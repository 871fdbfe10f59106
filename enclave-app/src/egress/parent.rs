//! The DNS stub's way to the parent: one long-lived stream connection to the parent's
//! `mode: dns` route (`--parent-dns`), shared by every query.
//!
//! This module owns that connection: DNS over a stream (each message behind a two-byte length,
//! RFC 1035 §4.2.2; framed by tokio-util's length-delimited codec, messages built and parsed
//! with hickory-proto), several queries in flight at once with ids of our own (at most
//! [`MAX_IN_FLIGHT`], the parent's own limit per connection; more wait), answers matched by id.
//! The connection is made when a query needs it and closed by the parent when idle (its
//! `idle_timeout`, 30 s by default); a lost connection fails the queries in flight, and
//! [`ParentDns::ask`] asks once more on a new connection before giving up. One task owns the
//! connection, so nothing is shared but a bounded channel.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use nitro_vsock_proxy::net::endpoint::{Endpoint, Stream};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tracing::{debug, warn};

/// Queries sent on the connection and not answered yet; the parent answers at most 64 at once
/// per connection and pauses reading beyond that, so more would only queue there.
pub const MAX_IN_FLIGHT: usize = 64;
/// Queries waiting for the connection's task; callers beyond that wait to hand theirs over.
const QUEUE: usize = 256;
/// The largest answer accepted from the parent (its answers to one question are far smaller).
const MAX_ANSWER_LEN: usize = 16 * 1024;

/// Why the parent gave no answer.
#[derive(Debug)]
enum Lost {
    /// The connection could not be made or broke before the answer: worth asking again.
    Connection(String),
    /// The connection's task is gone (the process is stopping).
    Stopped,
}

struct Request {
    query: Message,
    reply: oneshot::Sender<Result<Message, Lost>>,
}

/// A handle to the connection's task; cheap to clone.
#[derive(Clone, Debug)]
pub struct ParentDns {
    requests: mpsc::Sender<Request>,
}

impl ParentDns {
    /// Starts the task that owns the connection to `target`; `connect_timeout` bounds each
    /// attempt to connect.
    pub fn start(target: Endpoint, connect_timeout: Duration) -> ParentDns {
        let (requests, queue) = mpsc::channel(QUEUE);
        tokio::spawn(own_connection(target, connect_timeout, queue));
        ParentDns { requests }
    }

    /// Asks the parent for `name`'s records of `record_type` (with EDNS, so that a refusal
    /// comes with its Extended DNS Error); on a lost connection, once more on a new one. The
    /// caller bounds the time (`--dns-timeout`).
    pub async fn ask(&self, name: &Name, record_type: RecordType) -> Result<Message, String> {
        let mut query = Message::new(0, MessageType::Query, OpCode::Query);
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(name.clone(), record_type));
        query.set_edns(Edns::new());
        match self.ask_once(query.clone()).await {
            Err(Lost::Connection(first)) => {
                debug!(error = %first, "the parent's DNS connection was lost; asking again on a new one");
                self.ask_once(query).await.map_err(|e| match e {
                    Lost::Connection(second) => second,
                    Lost::Stopped => "stopping".to_owned(),
                })
            }
            Err(Lost::Stopped) => Err("stopping".to_owned()),
            Ok(answer) => Ok(answer),
        }
    }

    async fn ask_once(&self, query: Message) -> Result<Message, Lost> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { query, reply })
            .await
            .map_err(|_| Lost::Stopped)?;
        answer.await.map_err(|_| Lost::Stopped)?
    }
}

type Reader = FramedRead<ReadHalf<Stream>, LengthDelimitedCodec>;
type Writer = FramedWrite<WriteHalf<Stream>, LengthDelimitedCodec>;

/// The connection's task: sends queued queries, matches answers to them, reconnects when a
/// query needs it. Ends when every [`ParentDns`] handle is gone.
async fn own_connection(
    target: Endpoint,
    connect_timeout: Duration,
    mut queue: mpsc::Receiver<Request>,
) {
    let mut reader: Option<Reader> = None;
    let mut writer: Option<Writer> = None;
    let mut waiting: HashMap<u16, oneshot::Sender<Result<Message, Lost>>> = HashMap::new();
    let mut next_id: u16 = std::process::id() as u16;
    loop {
        // A caller that gave up (its --dns-timeout passed) frees its slot now, not when an
        // answer that nobody waits for arrives.
        waiting.retain(|_, reply| !reply.is_closed());
        tokio::select! {
            request = queue.recv(), if waiting.len() < MAX_IN_FLIGHT => {
                let Some(Request { mut query, reply }) = request else {
                    return;
                };
                if reply.is_closed() {
                    continue;
                }
                if writer.is_none() {
                    match connect(&target, connect_timeout).await {
                        Ok((r, w)) => {
                            reader = Some(r);
                            writer = Some(w);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(Lost::Connection(e)));
                            continue;
                        }
                    }
                }
                // An id no query in flight has (at most MAX_IN_FLIGHT are taken).
                while waiting.contains_key(&next_id) {
                    next_id = next_id.wrapping_add(1);
                }
                let id = next_id;
                next_id = next_id.wrapping_add(1);
                query.metadata.id = id;
                let bytes = match query.to_vec() {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        let _ = reply.send(Err(Lost::Connection(format!("cannot encode the query: {e}"))));
                        continue;
                    }
                };
                let sent = match writer.as_mut() {
                    Some(w) => w.send(Bytes::from(bytes)).await.map_err(|e| e.to_string()),
                    None => Err("not connected".to_owned()),
                };
                match sent {
                    Ok(()) => {
                        waiting.insert(id, reply);
                    }
                    Err(e) => {
                        let e = format!("cannot send a query to the parent's dns route on {target}: {e}");
                        let _ = reply.send(Err(Lost::Connection(e.clone())));
                        fail_all(&mut waiting, &e);
                        reader = None;
                        writer = None;
                    }
                }
            }
            frame = next_frame(&mut reader) => {
                match frame {
                    Some(Ok(bytes)) => match Message::from_vec(&bytes) {
                        Ok(answer) => {
                            if let Some(reply) = waiting.remove(&answer.metadata.id) {
                                let _ = reply.send(Ok(answer));
                            }
                        }
                        Err(e) => warn!(%target, "the parent's dns route sent a message that does not parse ({e}); ignored"),
                    },
                    end => {
                        // Closed (the parent's idle timeout, a restart) or broken: the queries
                        // in flight are asked again by their callers, on a new connection.
                        let why = match end {
                            Some(Err(e)) => format!("the connection to the parent's dns route on {target} failed: {e}"),
                            _ => format!("the parent's dns route on {target} closed the connection"),
                        };
                        if !waiting.is_empty() {
                            debug!("{why}; {} queries in flight are asked again", waiting.len());
                        }
                        fail_all(&mut waiting, &why);
                        reader = None;
                        writer = None;
                    }
                }
            }
        }
    }
}

/// The next answer on the connection; never, when there is none.
async fn next_frame(
    reader: &mut Option<Reader>,
) -> Option<Result<bytes::BytesMut, std::io::Error>> {
    match reader.as_mut() {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

fn fail_all(waiting: &mut HashMap<u16, oneshot::Sender<Result<Message, Lost>>>, why: &str) {
    for (_, reply) in waiting.drain() {
        let _ = reply.send(Err(Lost::Connection(why.to_owned())));
    }
}

async fn connect(target: &Endpoint, timeout: Duration) -> Result<(Reader, Writer), String> {
    let stream = match tokio::time::timeout(timeout, target.connect()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            return Err(format!(
                "cannot reach the parent's dns route on {target}: {e} ({})",
                super::unreachable_hint(target, "mode: dns")
            ))
        }
        Err(_) => {
            return Err(format!(
                "cannot reach the parent's dns route on {target}: no connection within {} ({})",
                humantime::format_duration(timeout),
                super::unreachable_hint(target, "mode: dns")
            ))
        }
    };
    let (r, w) = tokio::io::split(stream);
    let codec = || {
        LengthDelimitedCodec::builder()
            .length_field_length(2)
            .max_frame_length(MAX_ANSWER_LEN)
            .new_codec()
    };
    Ok((FramedRead::new(r, codec()), FramedWrite::new(w, codec())))
}
