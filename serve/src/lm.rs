//! Serving a language model: compute threads (instances) per served version,
//! each owning a copy of the network, that take the version's work in
//! arrival order from one queue, each job to completion: next-token logits
//! for OIP `infer` on token ids, and generation for Triton's generate
//! extension (`/generate`, `/generate_stream`).
//!
//! There is no dynamic batching here: an `infer` request runs as one forward
//! pass over its own `[batch, t]` ids, and a generation runs alone from its
//! first token to its last through `Gpt::generate` (seeded sampling with the
//! KV cache, the code `kiln generate` runs), so a generation's text depends
//! only on its prompt and parameters (and never on the instance that ran it:
//! the copies hold the same weights). libtorch tensors are `Send` but not
//! `Sync`, so each instance owns its copy rather than sharing one; the
//! bounded queue in front of them answers 503 when full.
//!
//! A generation reports each token's text as it is produced
//! ([`GenerateEvent::Piece`]); [`TextStream`] turns tokens into pieces whose
//! concatenation is exactly the decoded text of the whole generation. It
//! stops early when its client goes away (the event channel closes) or its
//! time limit passes.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};

use crate::batcher::JobOutput;
use crate::error::{ErrorKind, RequestError};
use crate::metrics::{Metrics, VersionLabels};
use crate::model::ServingNet;
use crate::protocol::TokenInput;

/// How to sample a generation (Triton's generate parameters).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateParams {
    /// Most tokens to generate (fewer when the context fills).
    pub max_tokens: usize,
    /// 0 picks the most likely token; otherwise softmax(logits / temperature).
    pub temperature: f64,
    /// Sample among the k most likely tokens only.
    pub top_k: Option<usize>,
    /// Seed of the sampler: the same seed, prompt and parameters give the same text.
    pub seed: u64,
}

/// What a generation reports, in order: pieces, then `Done` or `Failed`.
#[derive(Debug, Clone)]
pub enum GenerateEvent {
    /// The text of one generated token (empty when the token ends inside a
    /// multi-byte character; the character comes with a later piece).
    Piece(String),
    /// Finished: the whole generated text (the concatenation of the pieces)
    /// and its number of tokens.
    Done { text: String, tokens: usize },
    /// Failed, possibly after some pieces.
    Failed(RequestError),
}

/// A generation waiting for the compute thread.
pub struct GenerateJob {
    /// The prompt's token ids (checked: 1 to context ids, all in the vocabulary).
    pub prompt: Vec<i64>,
    pub params: GenerateParams,
    pub tokenizer: Arc<kiln_text::Tokenizer>,
    /// Generation stops, with a timeout error, once this passes.
    pub deadline: Instant,
    pub enqueued: Instant,
    pub events: mpsc::UnboundedSender<GenerateEvent>,
}

/// Work for a language model's compute thread.
pub enum LmJob {
    /// Next-token logits of a batch of sequences.
    Logits {
        tokens: TokenInput,
        enqueued: Instant,
        reply: oneshot::Sender<Result<JobOutput, RequestError>>,
    },
    Generate(GenerateJob),
}

impl LmJob {
    /// Whether the client already gave up on this job.
    fn abandoned(&self) -> bool {
        match self {
            LmJob::Logits { reply, .. } => reply.is_closed(),
            LmJob::Generate(job) => job.events.is_closed(),
        }
    }
}

/// The sending side of a language model's queue. Dropping every clone stops
/// the compute thread once the queue is drained.
#[derive(Clone)]
pub struct LmQueue {
    tx: SyncSender<LmJob>,
}

impl LmQueue {
    /// Starts a compute thread for each network of `nets` (a version's
    /// instances) with a queue of `capacity` jobs; `threads` is libtorch's
    /// intra-op thread count in each (0: its default).
    pub fn start(
        nets: Vec<ServingNet>,
        capacity: usize,
        threads: usize,
        metrics: Metrics,
        labels: VersionLabels,
        name: String,
    ) -> std::io::Result<LmQueue> {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        let rx = Arc::new(Mutex::new(rx));
        let count = nets.len();
        for (i, net) in nets.into_iter().enumerate() {
            let (rx, metrics, labels) = (rx.clone(), metrics.clone(), labels.clone());
            let thread = if count > 1 {
                format!("{name}.{i}")
            } else {
                name.clone()
            };
            std::thread::Builder::new()
                .name(thread)
                .spawn(move || compute_loop(net, &rx, threads, metrics, labels))?;
        }
        Ok(LmQueue { tx })
    }

    /// Queues a job; refuses at once when the queue is full.
    pub fn submit(&self, job: LmJob) -> Result<(), RequestError> {
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(RequestError::unavailable(
                "the model's request queue is full; retry later",
            )),
            Err(TrySendError::Disconnected(_)) => Err(RequestError::unavailable(
                "the model version stopped; retry",
            )),
        }
    }
}

fn compute_loop(
    net: ServingNet,
    rx: &Mutex<Receiver<LmJob>>,
    threads: usize,
    metrics: Metrics,
    labels: VersionLabels,
) {
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    // The lock is held only while waiting for the next job, never while
    // running one.
    let next = || rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
    while let Ok(job) = next() {
        if job.abandoned() {
            continue;
        }
        match job {
            LmJob::Logits {
                tokens,
                enqueued,
                reply,
            } => {
                let started = Instant::now();
                let queued = started.saturating_duration_since(enqueued);
                metrics.observe_queue(&labels, queued);
                let result = catch(|| net.next_token_logits(tokens.rows, tokens.len, &tokens.ids));
                let compute = started.elapsed();
                metrics.observe_batch(&labels, tokens.rows, compute);
                let result = result
                    .map(|logits| JobOutput {
                        logits,
                        queued,
                        batch_rows: tokens.rows,
                        compute,
                    })
                    .map_err(|e| {
                        tracing::error!(model = %labels.model, version = %labels.version, error = %format!("{e:#}"), "forward pass failed");
                        RequestError::internal(format!("inference failed: {e:#}"))
                    });
                let _ = reply.send(result);
            }
            LmJob::Generate(job) if Instant::now() >= job.deadline => {
                let _ = job.events.send(GenerateEvent::Failed(RequestError::new(
                    ErrorKind::Timeout,
                    "the generation waited in the queue past the request's time limit",
                )));
            }
            LmJob::Generate(job) => {
                let started = Instant::now();
                metrics.observe_queue(&labels, started.saturating_duration_since(job.enqueued));
                let events = job.events.clone();
                let last = catch(|| generate(&net, &job)).unwrap_or_else(|e| {
                    tracing::error!(model = %labels.model, version = %labels.version, error = %format!("{e:#}"), "generation failed");
                    GenerateEvent::Failed(RequestError::internal(format!(
                        "generation failed: {e:#}"
                    )))
                });
                metrics.observe_batch(&labels, 1, started.elapsed());
                if let GenerateEvent::Done { tokens, .. } = &last {
                    metrics.observe_generated(&labels, *tokens);
                }
                let _ = events.send(last);
            }
        }
    }
    tracing::debug!(model = %labels.model, version = %labels.version, "compute thread stopped");
}

/// Runs `f`, turning a libtorch panic into an error.
fn catch<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(anyhow::anyhow!("libtorch failed: {what}"))
    })
}

/// Runs one generation, sending a piece per token; returns the final event.
fn generate(net: &ServingNet, job: &GenerateJob) -> Result<GenerateEvent> {
    let gpt = net
        .gpt()
        .context("generation on a model that is not a language model")?;
    let p = job.params;
    let mut text = TextStream::new(&job.tokenizer);
    let mut failed: Option<RequestError> = None;
    let tokens = gpt.generate(
        &job.prompt,
        p.max_tokens,
        p.temperature,
        p.top_k,
        p.seed,
        |token| {
            let piece = match text.push(token) {
                Ok(piece) => piece,
                Err(e) => {
                    failed = Some(RequestError::internal(format!(
                        "decode generated token {token}: {e:#}"
                    )));
                    return false;
                }
            };
            if job.events.send(GenerateEvent::Piece(piece)).is_err() {
                // The client went away: stop spending compute on it.
                return false;
            }
            if Instant::now() >= job.deadline {
                failed = Some(RequestError::new(
                    ErrorKind::Timeout,
                    "the generation did not finish within the request's time limit",
                ));
                return false;
            }
            true
        },
    )?;
    if let Some(e) = failed {
        return Ok(GenerateEvent::Failed(e));
    }
    let (rest, whole) = text.finish()?;
    if !rest.is_empty() {
        let _ = job.events.send(GenerateEvent::Piece(rest));
    }
    Ok(GenerateEvent::Done {
        text: whole,
        tokens: tokens.len(),
    })
}

/// Turns generated tokens into text pieces as they come: each piece is the
/// text the token completes. A token that ends inside a multi-byte character
/// decodes to U+FFFD for now; that text is held back until a later token
/// completes the character (or the generation ends), so the pieces
/// concatenate to exactly the decoded text of all the tokens.
pub struct TextStream<'a> {
    tokenizer: &'a kiln_text::Tokenizer,
    ids: Vec<u32>,
    /// The text sent so far.
    sent: String,
}

impl<'a> TextStream<'a> {
    /// A stream with no tokens yet.
    pub fn new(tokenizer: &'a kiln_text::Tokenizer) -> TextStream<'a> {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            sent: String::new(),
        }
    }

    /// Adds a token; returns the text to send for it (possibly empty).
    pub fn push(&mut self, token: i64) -> Result<String> {
        let id = u32::try_from(token).with_context(|| format!("token {token} is not an id"))?;
        self.ids.push(id);
        let full = self.tokenizer.decode(&self.ids)?;
        let stable = full.trim_end_matches('\u{FFFD}');
        match stable.strip_prefix(self.sent.as_str()) {
            Some(new) => {
                let new = new.to_string();
                self.sent.push_str(&new);
                Ok(new)
            }
            // Decoding more tokens changed text already sent (a tokenizer
            // whose decoder looks ahead): wait for the end.
            None => Ok(String::new()),
        }
    }

    /// The text not sent yet and the whole text.
    pub fn finish(self) -> Result<(String, String)> {
        let full = self.tokenizer.decode(&self.ids)?;
        let rest = match full.strip_prefix(self.sent.as_str()) {
            Some(rest) => rest.to_string(),
            None => {
                tracing::warn!(
                    "the decoded text differs from the pieces streamed; the last piece carries the difference"
                );
                String::new()
            }
        };
        Ok((rest, full))
    }
}

/// Runs a few passes so the first real request does not pay for libtorch's
/// lazy initialisation: logits at one token and at the full context, and a
/// short greedy generation (the KV cache path).
pub fn warm_up(net: &ServingNet) -> Result<()> {
    let gpt = net
        .gpt()
        .context("warm up a model that is not a language model")?;
    let context = gpt.config().seq_len;
    for _ in 0..3 {
        net.next_token_logits(1, 1, &[0])?;
        net.next_token_logits(1, context, &vec![0; context])?;
    }
    gpt.generate(&[0], 2.min(context), 0.0, None, 0, |_| true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hold_back_partial_characters_and_add_up_to_the_text() {
        let tokenizer = kiln_text::Tokenizer::byte_level();
        // "a", "é" (two bytes), "b", then half of "€" (three bytes).
        let text = "aéb€";
        let ids: Vec<i64> = tokenizer
            .encode(text)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(ids.len(), 1 + 2 + 1 + 3);
        let mut stream = TextStream::new(&tokenizer);
        let pieces: Vec<String> = ids[..6].iter().map(|&t| stream.push(t).unwrap()).collect();
        assert_eq!(pieces, ["a", "", "é", "b", "", ""]);
        let (rest, whole) = stream.finish().unwrap();
        // The generation ended inside "€": the rest is what decoding says.
        assert_eq!(whole, format!("aéb{}", '\u{FFFD}'));
        assert_eq!(pieces.concat() + &rest, whole);

        let mut stream = TextStream::new(&tokenizer);
        let pieces: Vec<String> = ids.iter().map(|&t| stream.push(t).unwrap()).collect();
        assert_eq!(pieces.last().unwrap(), "€");
        let (rest, whole) = stream.finish().unwrap();
        assert_eq!((rest.as_str(), whole.as_str()), ("", text));
        assert!(TextStream::new(&tokenizer).push(-1).is_err());
    }
}
