//! One home for graft's secrets and randomness: random bytes from the kernel
//! (`getrandom(2)`, through the `getrandom` crate), compares of secrets in
//! constant time (`subtle`), and hex (`hex`). Session secrets, link tokens,
//! hub keys and nonces, chain names and session ids are all made, compared and
//! written here.

use std::io;

use subtle::ConstantTimeEq;

/// `N` random bytes from the kernel's random source (`getrandom(2)`).
///
/// # Errors
///
/// The system's random source failed (a kernel without `getrandom(2)` and no
/// readable `/dev/urandom`).
pub fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| io::Error::other(format!("the system's random source failed: {e}")))?;
    Ok(bytes)
}

/// `len` random bytes as `2 * len` lower-case hex digits.
///
/// # Errors
///
/// As [`random_bytes`].
pub fn random_hex(len: usize) -> io::Result<String> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes)
        .map_err(|e| io::Error::other(format!("the system's random source failed: {e}")))?;
    Ok(hex(&bytes))
}

/// `bytes` as lower-case hex digits, two per byte.
pub fn hex(bytes: impl AsRef<[u8]>) -> String {
    ::hex::encode(bytes)
}

/// Whether two secrets are equal, in time that depends only on their lengths
/// (`subtle`'s constant-time compare): a peer that guesses learns nothing from
/// how long a refusal took about where its guess went wrong.
pub fn secrets_match(given: impl AsRef<[u8]>, expected: impl AsRef<[u8]>) -> bool {
    given.as_ref().ct_eq(expected.as_ref()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_differ_and_have_their_length() {
        let a: [u8; 16] = random_bytes().unwrap();
        let b: [u8; 16] = random_bytes().unwrap();
        assert_ne!(a, b);
        let h = random_hex(8).unwrap();
        assert_eq!(h.len(), 16);
        assert!(
            h.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(h, random_hex(8).unwrap());
    }

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex([0x00, 0x0f, 0xab, 0xff]), "000fabff");
        assert_eq!(hex([]), "");
    }

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(secrets_match("s3cret", "s3cret"));
        assert!(!secrets_match("s3cre", "s3cret"));
        assert!(!secrets_match("s3cret!", "s3cret"));
        assert!(!secrets_match("S3cret", "s3cret"));
        assert!(!secrets_match("", "s3cret"));
        assert!(!secrets_match("ab", "ab\u{7f}"));
        assert!(secrets_match([1u8, 2], [1u8, 2]));
    }
}
