//! OpenSSL's legacy PEM key encryption (`Proc-Type: 4,ENCRYPTED` with
//! `DEK-Info`): many old APNs .pem files were exported this way.

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, KeyIvInit};
use md5::{Digest, Md5};

/// Decrypts a legacy-encrypted key body given its `DEK-Info` value
/// (`<cipher>,<iv hex>`).
pub(crate) fn decrypt(dek_info: &str, password: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    let (cipher, iv_hex) = dek_info
        .split_once(',')
        .ok_or_else(|| format!("legacy encrypted key: unreadable DEK-Info {dek_info:?}"))?;
    let iv = hex(iv_hex.trim())
        .ok_or_else(|| format!("legacy encrypted key: bad IV in DEK-Info {dek_info:?}"))?;
    let key_len = match cipher.trim() {
        "AES-128-CBC" => 16,
        "AES-192-CBC" => 24,
        "AES-256-CBC" => 32,
        "DES-EDE3-CBC" => 24,
        other => {
            return Err(format!(
                "legacy encrypted key uses {other}, which is not supported; convert it with \
                 `openssl pkcs8 -topk8 -v2 aes-256-cbc -in old.pem -out key.pem`"
            ))
        }
    };
    let salt = iv
        .get(..8)
        .ok_or("legacy encrypted key: IV shorter than 8 bytes")?;
    let key = bytes_to_key(password.as_bytes(), salt, key_len);
    let wrong = |_| "wrong password for the encrypted private key".to_owned();
    let bad_iv = |_| "legacy encrypted key: IV of the wrong length".to_owned();
    match cipher.trim() {
        "AES-128-CBC" => cbc::Decryptor::<aes::Aes128>::new_from_slices(&key, &iv)
            .map_err(bad_iv)?
            .decrypt_padded_vec_mut::<Pkcs7>(data)
            .map_err(wrong),
        "AES-192-CBC" => cbc::Decryptor::<aes::Aes192>::new_from_slices(&key, &iv)
            .map_err(bad_iv)?
            .decrypt_padded_vec_mut::<Pkcs7>(data)
            .map_err(wrong),
        "AES-256-CBC" => cbc::Decryptor::<aes::Aes256>::new_from_slices(&key, &iv)
            .map_err(bad_iv)?
            .decrypt_padded_vec_mut::<Pkcs7>(data)
            .map_err(wrong),
        _ => cbc::Decryptor::<des::TdesEde3>::new_from_slices(&key, &iv)
            .map_err(bad_iv)?
            .decrypt_padded_vec_mut::<Pkcs7>(data)
            .map_err(wrong),
    }
}

/// OpenSSL's `EVP_BytesToKey` with MD5 and one iteration.
fn bytes_to_key(password: &[u8], salt: &[u8], len: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(len + 16);
    let mut prev: Vec<u8> = Vec::new();
    while key.len() < len {
        let mut h = Md5::new();
        h.update(&prev);
        h.update(password);
        h.update(salt);
        prev = h.finalize().to_vec();
        key.extend_from_slice(&prev);
    }
    key.truncate(len);
    key
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_to_key_matches_openssl() {
        // `openssl enc -aes-256-cbc -P -md md5 -pass pass:secret -S 0001020304050607`
        let key = bytes_to_key(b"secret", &[0, 1, 2, 3, 4, 5, 6, 7], 32);
        assert_eq!(
            key,
            hex("035FB8145B73CF111570DC936112BE9C375A5D3D8B915BC213BDBEF9DBFB7851").unwrap()
        );
        assert_eq!(hex("0a0B").unwrap(), vec![10, 11]);
        assert!(hex("0").is_none());
    }

    #[test]
    fn unknown_cipher_says_how_to_convert() {
        let err = decrypt("BF-CBC,0001020304050607", "pw", &[0; 16]).unwrap_err();
        assert!(err.contains("openssl pkcs8 -topk8"), "{err}");
    }
}
