//! What a tool answered, handed back as untrusted: marked so, with where it came from, the
//! content blocks and structured content as the server sent them (never interpreted), cut
//! to a size cap and flagged when cut. The audit gets the digest and size of the whole
//! answer, not the answer.
use rmcp::model::CallToolResult;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The server a result came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultServer {
    pub id: String,
    pub name: String,
}

/// A tool's answer as Switchboard hands it on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEnvelope {
    /// Always `true`: the content is the tool's, and may try to instruct whoever reads it.
    pub untrusted: bool,
    pub server: ResultServer,
    /// The tool's name on its server.
    pub tool: String,
    /// MCP content blocks as sent (those that fit under the cap).
    pub content: Vec<Value>,
    /// MCP `structuredContent` as sent; `null` when absent or when it did not fit.
    pub structured_content: Option<Value>,
    /// MCP `isError`: the tool ran and reported a failure.
    pub is_error: bool,
    /// Something was left out or cut to stay under the size cap.
    pub truncated: bool,
}

/// The audit facts of an answer: SHA-256 (hex) and size of its JSON as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultDigest {
    pub sha256: String,
    pub size_bytes: u64,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    lower_hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// `bytes` as lowercase hex.
pub(crate) fn lower_hex(bytes: &[u8]) -> String {
    // Two digests per invocation: a `format!` per byte cost more than the digest itself.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// Room kept for the JSON around a cut text (quotes, escapes grow the text: budget counts
/// the serialised form).
const BLOCK_OVERHEAD: usize = 64;

impl ResultEnvelope {
    /// Builds the envelope of `result` with at most `limit` bytes of content and structured
    /// content (as serialised JSON), and the digest of the whole answer.
    pub fn build(
        server: ResultServer,
        tool: String,
        result: CallToolResult,
        limit: usize,
    ) -> (ResultEnvelope, ResultDigest) {
        let whole = serde_json::to_vec(&result).unwrap_or_default();
        let digest = ResultDigest {
            sha256: sha256_hex(&whole),
            size_bytes: whole.len() as u64,
        };
        let is_error = result.is_error.unwrap_or(false);
        let blocks: Vec<Value> = result
            .content
            .iter()
            .map(|block| serde_json::to_value(block).unwrap_or(Value::Null))
            .collect();
        // The blocks and the structured content are parts of the whole answer's JSON, so
        // an answer under the cap needs no measuring part by part (each a serialisation).
        let (content, structured_content, truncated) = if whole.len() <= limit {
            (blocks, result.structured_content, false)
        } else {
            cap(blocks, result.structured_content, limit)
        };
        (
            ResultEnvelope {
                untrusted: true,
                server,
                tool,
                content,
                structured_content,
                is_error,
                truncated,
            },
            digest,
        )
    }

    /// What `render` makes of this envelope, cut until it takes at most `budget` bytes —
    /// for a channel that holds less than the size cap (a NATS message, an event) — and
    /// whether it was cut: each try cuts in proportion to how far the last was over, and a
    /// tenth more (escapes make a rendering grow faster than the content); the last keeps
    /// no content. `None` when not even that fits.
    pub fn render_within<T: AsRef<[u8]>>(
        &self,
        budget: usize,
        render: impl Fn(&ResultEnvelope) -> T,
    ) -> Option<(T, bool)> {
        let whole = render(self);
        let mut rendered = whole.as_ref().len();
        if rendered <= budget {
            return Some((whole, false));
        }
        let mut limit = self.content.iter().map(json_len).sum::<usize>()
            + self.structured_content.as_ref().map_or(0, json_len);
        for _ in 0..4 {
            limit = usize::try_from(limit as u128 * budget as u128 * 9 / (rendered as u128 * 10))
                .unwrap_or(0);
            let attempt = render(&self.cut_to(limit));
            rendered = attempt.as_ref().len();
            if rendered <= budget {
                return Some((attempt, true));
            }
        }
        Some(render(&self.cut_to(0)))
            .filter(|bare| bare.as_ref().len() <= budget)
            .map(|bare| (bare, true))
    }

    /// This envelope with at most `limit` bytes of content and structured content, cut as
    /// [`ResultEnvelope::build`] cuts an answer (and flagged `truncated` if anything was):
    /// for a channel that holds less than the size cap, such as one NATS message.
    pub fn cut_to(&self, limit: usize) -> ResultEnvelope {
        let (content, structured_content, cut) =
            cap(self.content.clone(), self.structured_content.clone(), limit);
        ResultEnvelope {
            untrusted: self.untrusted,
            server: self.server.clone(),
            tool: self.tool.clone(),
            content,
            structured_content,
            is_error: self.is_error,
            truncated: self.truncated || cut,
        }
    }
}

fn json_len(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(0, |bytes| bytes.len())
}

/// Keeps blocks in order while they fit, cuts the text of the first text block that does not
/// (at a character boundary), drops the rest; keeps structured content only if it still fits.
fn cap(
    blocks: Vec<Value>,
    structured: Option<Value>,
    limit: usize,
) -> (Vec<Value>, Option<Value>, bool) {
    let sizes: Vec<usize> = blocks.iter().map(json_len).collect();
    let structured_size = structured.as_ref().map_or(0, json_len);
    if sizes.iter().sum::<usize>() + structured_size <= limit {
        return (blocks, structured, false);
    }
    let mut budget = limit;
    let mut kept = Vec::new();
    for (block, size) in blocks.into_iter().zip(sizes) {
        if size <= budget {
            budget -= size;
            kept.push(block);
            continue;
        }
        if let Some(cut) = cut_text_block(&block, budget) {
            kept.push(cut);
        }
        budget = 0;
        break;
    }
    let structured = structured.filter(|_| structured_size <= budget);
    (kept, structured, true)
}

/// A text block cut to fit `budget` bytes of JSON, if there is room for any of its text.
fn cut_text_block(block: &Value, budget: usize) -> Option<Value> {
    let text = block.get("text")?.as_str()?;
    if block.get("type").and_then(Value::as_str) != Some("text") || budget <= BLOCK_OVERHEAD {
        return None;
    }
    let mut end = (budget - BLOCK_OVERHEAD).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = block.clone();
    cut["text"] = Value::String(text[..end].to_owned());
    // Escapes can make the JSON longer than the text: shorten until it fits. Each length is
    // measured once (a block may be megabytes of JSON).
    loop {
        let over = json_len(&cut).saturating_sub(budget);
        if over == 0 {
            return Some(cut);
        }
        // What is not text (`_meta`, annotations) may alone be over the budget: then
        // nothing of the block fits.
        if end == 0 {
            return None;
        }
        end = end.saturating_sub(over);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        cut["text"] = Value::String(text[..end].to_owned());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn text(t: &str) -> Value {
        json!({"type": "text", "text": t})
    }

    #[test]
    fn a_text_block_whose_other_fields_are_over_the_cap_is_dropped_not_kept() {
        let heavy = json!({"type": "text", "text": "x", "_meta": {"blob": "b".repeat(5_000)}});
        let (content, structured, truncated) = cap(vec![text("a"), heavy], None, 1_000);
        assert_eq!(content, vec![text("a")]);
        assert_eq!(structured, None);
        assert!(truncated);
    }

    #[test]
    fn a_result_under_the_cap_is_kept_whole() {
        let (content, structured, truncated) = cap(vec![text("a")], Some(json!({"k": 1})), 1024);
        assert_eq!(content, vec![text("a")]);
        assert_eq!(structured, Some(json!({"k": 1})));
        assert!(!truncated);
    }

    #[test]
    fn an_oversized_result_is_cut_under_the_cap_and_flagged() {
        let big = "é\"x".repeat(100_000);
        let (content, structured, truncated) = cap(
            vec![text("head"), text(&big), text("tail")],
            Some(json!({"k": 1})),
            4096,
        );
        assert!(truncated);
        assert_eq!(content.len(), 2);
        assert_eq!(content[0], text("head"));
        let total: usize = content.iter().map(json_len).sum();
        assert!(total <= 4096, "{total}");
        assert!(content[1]["text"].as_str().unwrap().len() > 3000);
        assert_eq!(structured, None);
    }

    #[test]
    fn the_digest_covers_the_whole_answer() {
        let result: CallToolResult =
            serde_json::from_value(json!({"content": [text(&"x".repeat(10_000))]})).unwrap();
        let server = ResultServer {
            id: "s".into(),
            name: "S".into(),
        };
        let (envelope, digest) = ResultEnvelope::build(server, "t".into(), result, 1000);
        assert!(envelope.truncated && envelope.untrusted);
        assert!(digest.size_bytes > 10_000);
        assert_eq!(digest.sha256.len(), 64);
    }

    #[test]
    fn an_answer_at_the_cap_or_whose_parts_fit_it_is_kept_whole() {
        let result: CallToolResult = serde_json::from_value(
            json!({"content": [text("first"), text("second")], "structuredContent": {"k": "v"}}),
        )
        .unwrap();
        let whole = serde_json::to_vec(&result).unwrap().len();
        let parts =
            json_len(&text("first")) + json_len(&text("second")) + json_len(&json!({"k": "v"}));
        // A cap the whole answer fits keeps it without measuring its parts; a smaller cap
        // that only the parts fit (the whole holds them and more) measures them, and keeps
        // them too.
        for limit in [whole, parts] {
            let server = ResultServer {
                id: "s".into(),
                name: "S".into(),
            };
            let (envelope, _) = ResultEnvelope::build(server, "t".into(), result.clone(), limit);
            assert!(!envelope.truncated, "cap {limit}");
            assert_eq!(envelope.content, vec![text("first"), text("second")]);
            assert_eq!(envelope.structured_content, Some(json!({"k": "v"})));
        }
        assert!(parts < whole);
    }

    #[test]
    fn a_digest_is_the_lowercase_hex_of_sha256() {
        // FIPS 180-2's first example, with digits and letters on both sides of every nibble.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
