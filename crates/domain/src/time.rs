//! Between `SystemTime` (what callers pass as `now`; the domain never reads a clock) and the
//! protobuf `Timestamp` events carry.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::Timestamp;

/// A point in time as an event carries it. Saturates at the ends of `i64` seconds.
pub fn to_timestamp(time: SystemTime) -> Timestamp {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => Timestamp {
            seconds: i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            nanos: after.subsec_nanos() as i32,
        },
        Err(before) => {
            let before = before.duration();
            let seconds = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            match before.subsec_nanos() {
                0 => Timestamp {
                    seconds: -seconds,
                    nanos: 0,
                },
                nanos => Timestamp {
                    seconds: -seconds - 1,
                    nanos: (1_000_000_000 - nanos) as i32,
                },
            }
        }
    }
}

/// The point in time an event's timestamp stands for. Out-of-range nanos are clamped and
/// times beyond what `SystemTime` holds saturate, so a malformed event cannot make this panic.
pub fn from_timestamp(timestamp: &Timestamp) -> SystemTime {
    let nanos = timestamp.nanos.clamp(0, 999_999_999) as u32;
    let seconds = Duration::from_secs(timestamp.seconds.unsigned_abs());
    let moved = if timestamp.seconds >= 0 {
        UNIX_EPOCH.checked_add(seconds)
    } else {
        UNIX_EPOCH.checked_sub(seconds)
    };
    let Some(whole) = moved else {
        return if timestamp.seconds >= 0 {
            far_future()
        } else {
            UNIX_EPOCH
        };
    };
    whole
        .checked_add(Duration::from_nanos(u64::from(nanos)))
        .unwrap_or(whole)
}

/// A time later than any deadline the domain sets (year ~2500), for saturating arithmetic.
fn far_future() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(16_725_225_600)
}

/// `from_timestamp` for an optional field.
pub fn from_optional_timestamp(timestamp: Option<&Timestamp>) -> Option<SystemTime> {
    timestamp.map(from_timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_roundtrip() {
        for time in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_760_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(5, 250_000_000),
            UNIX_EPOCH - Duration::from_secs(5),
        ] {
            assert_eq!(from_timestamp(&to_timestamp(time)), time, "{time:?}");
        }
        let before = to_timestamp(UNIX_EPOCH - Duration::new(5, 250_000_000));
        assert_eq!((before.seconds, before.nanos), (-6, 750_000_000));
    }

    #[test]
    fn malformed_timestamps_do_not_panic() {
        for (seconds, nanos) in [
            (i64::MAX, i32::MAX),
            (i64::MIN, i32::MIN),
            (0, -1),
            (1, 2_000_000_000),
        ] {
            let _ = from_timestamp(&Timestamp { seconds, nanos });
        }
    }
}
