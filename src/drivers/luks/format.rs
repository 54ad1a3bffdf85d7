//! The LUKS1 on-disk format as QEMU's crypto/block-luks.c reads and
//! writes it: the 592-byte big-endian header (magic, cipher and hash
//! names, payload offset, master key digest, eight key slots), key slots
//! whose anti-forensic split key material is encrypted with a key derived
//! from the passphrase by PBKDF2, and the payload encrypted sector by
//! sector (512 bytes, IV from the sector number counted from the start
//! of the payload, or of the key material).
//!
//! Ciphers: AES-128/256 in XTS (`xts-plain64`, `xts-plain`) and CBC
//! (`cbc-plain64`, `cbc-plain`, `cbc-essiv:sha256`); hashes sha1 and
//! sha256. Key bytes never appear in errors or logs. XTS and CBC are
//! built on the aes crate's multi-block calls (AES-NI, eight blocks in
//! flight); xts-mode is the reference the tests compare XTS with.

use aes::cipher::array::Array;
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes256};
use sha2::Digest;

/// Encryption sector size (QEMU's QCRYPTO_BLOCK_LUKS_SECTOR_SIZE).
pub const SECTOR: u64 = 512;
const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
pub const HEADER_LEN: usize = 592;
const NUM_SLOTS: usize = 8;
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
const STRIPES: u32 = 4000;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
/// Where QEMU puts the first key slot's material, and its alignment.
const KEY_SLOT_ALIGN: u64 = 4096;
const MIN_SLOT_ITERS: u64 = 1000;
const MIN_MK_ITERS: u64 = 1000;

/// QEMU's answer when no key slot opens with the passphrase.
pub const BAD_PASSWORD: &str = "Invalid password, cannot unlock any keyslot";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    pub fn parse(s: &str) -> Result<Hash, String> {
        match s {
            "sha1" => Ok(Hash::Sha1),
            "sha256" => Ok(Hash::Sha256),
            _ => Err(format!("Hash algorithm '{s}' is not supported")),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Hash::Sha1 => "sha1",
            Hash::Sha256 => "sha256",
        }
    }
    fn len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
        }
    }
    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        match self {
            Hash::Sha1 => {
                let mut h = sha1::Sha1::new();
                for p in parts {
                    h.update(p);
                }
                h.finalize().to_vec()
            }
            Hash::Sha256 => {
                let mut h = sha2::Sha256::new();
                for p in parts {
                    h.update(p);
                }
                h.finalize().to_vec()
            }
        }
    }
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iters: u32, out: &mut [u8]) {
        match self {
            Hash::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, iters, out),
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iters, out),
        }
    }
}

/// `cipher-mode` and `ivgen-alg` of blockdev-create, and what the header's
/// cipher_mode string says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Xts,
    Cbc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// Sector number, 32 bits little-endian.
    Plain,
    /// Sector number, 64 bits little-endian.
    Plain64,
    /// The sector number encrypted with the hash of the master key.
    Essiv(Hash),
}

/// A cipher spec: AES key length, mode and IV generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// AES key length in bytes (16 or 32).
    pub aes_key: usize,
    pub mode: Mode,
    pub ivgen: IvGen,
}

impl Spec {
    /// The master key's length (XTS takes two AES keys).
    pub fn key_bytes(&self) -> usize {
        match self.mode {
            Mode::Xts => self.aes_key * 2,
            Mode::Cbc => self.aes_key,
        }
    }

    /// The header's cipher_mode string.
    pub fn mode_string(&self) -> String {
        let m = match self.mode {
            Mode::Xts => "xts",
            Mode::Cbc => "cbc",
        };
        let iv = match self.ivgen {
            IvGen::Plain => "plain".to_string(),
            IvGen::Plain64 => "plain64".to_string(),
            IvGen::Essiv(h) => format!("essiv:{}", h.name()),
        };
        format!("{m}-{iv}")
    }

    /// Reads the header's cipher_name, cipher_mode and key_bytes.
    fn parse(name: &str, mode: &str, key_bytes: u32) -> Result<Spec, String> {
        if name != "aes" {
            return Err(format!("Cipher name '{name}' is not supported"));
        }
        let (m, iv) = mode
            .split_once('-')
            .ok_or_else(|| format!("Unexpected cipher mode string format '{mode}'"))?;
        let m = match m {
            "xts" => Mode::Xts,
            "cbc" => Mode::Cbc,
            _ => return Err(format!("Cipher mode '{m}' is not supported")),
        };
        let ivgen = match iv {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            _ => match iv.strip_prefix("essiv:") {
                Some(h) => IvGen::Essiv(Hash::parse(h)?),
                None => return Err(format!("IV generator '{iv}' is not supported")),
            },
        };
        let aes_key = match m {
            Mode::Xts => key_bytes / 2,
            Mode::Cbc => key_bytes,
        };
        if aes_key != 16 && aes_key != 32 {
            return Err(format!(
                "Cipher 'aes' with a {key_bytes}-byte key in mode '{mode}' is not supported"
            ));
        }
        if ivgen == IvGen::Essiv(Hash::Sha1) {
            return Err("Cipher 'aes' cannot take an ESSIV key from 'sha1' (20 bytes)".into());
        }
        Ok(Spec {
            aes_key: aes_key as usize,
            mode: m,
            ivgen,
        })
    }
}

enum Aes {
    A128(Box<Aes128>),
    A256(Box<Aes256>),
}

// Key lengths: Spec::parse and CreateSpec allow only 16 and 32-byte AES
// keys (and twice that for XTS), so the copies below cannot fail.
fn aes128(k: &[u8]) -> Aes128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(k);
    let c = Aes128::new(&a.into());
    wipe(&mut a);
    c
}

fn aes256(k: &[u8]) -> Aes256 {
    let mut a = [0u8; 32];
    a.copy_from_slice(k);
    let c = Aes256::new(&a.into());
    wipe(&mut a);
    c
}

impl Aes {
    fn new(key: &[u8]) -> Aes {
        match key.len() {
            16 => Aes::A128(Box::new(aes128(key))),
            _ => Aes::A256(Box::new(aes256(key))),
        }
    }
    fn encrypt_block(&self, b: &mut [u8; 16]) {
        let mut a = Array::from(*b);
        match self {
            Aes::A128(c) => c.encrypt_block(&mut a),
            Aes::A256(c) => c.encrypt_block(&mut a),
        }
        *b = a.into();
    }
    fn encrypt_blocks(&self, buf: &mut [u8]) {
        let (blocks, _) = Array::slice_as_chunks_mut(buf);
        match self {
            Aes::A128(c) => c.encrypt_blocks(blocks),
            Aes::A256(c) => c.encrypt_blocks(blocks),
        }
    }
    fn decrypt_blocks(&self, buf: &mut [u8]) {
        let (blocks, _) = Array::slice_as_chunks_mut(buf);
        match self {
            Aes::A128(c) => c.decrypt_blocks(blocks),
            Aes::A256(c) => c.decrypt_blocks(blocks),
        }
    }
}

enum Engine {
    /// XTS: the data key and the tweak key.
    Xts {
        data: Aes,
        tweak: Aes,
    },
    Cbc {
        aes: Aes,
        essiv: Option<Aes>,
    },
}

/// One XTS sector (IEEE 1619, whole blocks: a sector is 32 of them): the
/// tweaks are computed first, so that the blocks go through AES together
/// (AES-NI pipelines eight at a time), not one after another as
/// xts-mode's encrypt_sector does; the unit tests check that both agree.
fn xts_sector(data: &Aes, tweak: &Aes, s: &mut [u8], iv: [u8; 16], encrypt: bool) {
    const N: usize = SECTOR as usize / 16;
    let mut t = iv;
    tweak.encrypt_block(&mut t);
    let mut tweaks = [[0u8; 16]; N];
    for tw in tweaks.iter_mut() {
        *tw = t;
        // t *= alpha in GF(2^128), little-endian.
        let carry = t[15] >> 7;
        for j in (1..16).rev() {
            t[j] = (t[j] << 1) | (t[j - 1] >> 7);
        }
        t[0] = (t[0] << 1) ^ (0x87 * carry);
    }
    let xor_tweaks = |s: &mut [u8]| {
        for (b, tw) in s.chunks_exact_mut(16).zip(tweaks.iter()) {
            for j in 0..16 {
                b[j] ^= tw[j];
            }
        }
    };
    xor_tweaks(s);
    if encrypt {
        data.encrypt_blocks(s);
    } else {
        data.decrypt_blocks(s);
    }
    xor_tweaks(s);
}

/// A cipher keyed with a master key (or a key slot's derived key).
pub struct Cipher {
    engine: Engine,
    ivgen: IvGen,
}

impl Cipher {
    pub fn new(spec: &Spec, key: &[u8]) -> Cipher {
        let engine = match spec.mode {
            Mode::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                Engine::Xts {
                    data: Aes::new(k1),
                    tweak: Aes::new(k2),
                }
            }
            Mode::Cbc => Engine::Cbc {
                aes: Aes::new(key),
                essiv: match spec.ivgen {
                    IvGen::Essiv(h) => Some(Aes::new(&h.digest(&[key]))),
                    _ => None,
                },
            },
        };
        Cipher {
            engine,
            ivgen: spec.ivgen,
        }
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 | IvGen::Essiv(_) => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        }
        if let Engine::Cbc { essiv: Some(e), .. } = &self.engine {
            e.encrypt_block(&mut iv);
        }
        iv
    }

    /// Encrypts `buf` (whole sectors) in place; its first sector is
    /// `sector`.
    pub fn encrypt(&self, buf: &mut [u8], sector: u64) {
        for (i, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
            let iv = self.iv(sector.wrapping_add(i as u64));
            match &self.engine {
                Engine::Xts { data, tweak } => xts_sector(data, tweak, s, iv, true),
                Engine::Cbc { aes, .. } => {
                    let mut prev = iv;
                    for b in s.chunks_exact_mut(16) {
                        let mut blk = [0u8; 16];
                        for j in 0..16 {
                            blk[j] = b[j] ^ prev[j];
                        }
                        aes.encrypt_block(&mut blk);
                        b.copy_from_slice(&blk);
                        prev = blk;
                    }
                }
            }
        }
    }

    /// Decrypts `buf` (whole sectors) in place; its first sector is
    /// `sector`.
    pub fn decrypt(&self, buf: &mut [u8], sector: u64) {
        let mut saved = [0u8; SECTOR as usize];
        for (i, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
            let iv = self.iv(sector.wrapping_add(i as u64));
            match &self.engine {
                Engine::Xts { data, tweak } => xts_sector(data, tweak, s, iv, false),
                Engine::Cbc { aes, .. } => {
                    // Blocks decrypt independently (in parallel with
                    // AES-NI); then each is XORed with the ciphertext
                    // before it.
                    saved.copy_from_slice(s);
                    aes.decrypt_blocks(s);
                    for (j, b) in s.iter_mut().take(16).enumerate() {
                        *b ^= iv[j];
                    }
                    for (b, c) in s[16..].iter_mut().zip(saved.iter()) {
                        *b ^= c;
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Slot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// In sectors from the start of the image.
    pub key_offset: u32,
    pub stripes: u32,
}

/// A LUKS1 header.
#[derive(Debug, Clone)]
pub struct Header {
    pub spec: Spec,
    pub cipher_name: String,
    pub hash: Hash,
    /// In sectors.
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iters: u32,
    pub uuid: [u8; 40],
    pub slots: Vec<Slot>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Whether `b` starts with the LUKS magic.
pub fn is_luks(b: &[u8]) -> bool {
    b.starts_with(MAGIC)
}

impl Header {
    /// Parses and checks a header (QEMU's qcrypto_block_luks_load_header
    /// and check_header).
    pub fn parse(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN || !is_luks(b) {
            return Err("Volume is not in LUKS format".into());
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(format!("LUKS version {version} is not supported"));
        }
        let cipher_name = cstr(&b[8..40]);
        let cipher_mode = cstr(&b[40..72]);
        let hash = Hash::parse(&cstr(&b[72..104]))?;
        let payload_offset = be32(b, 104);
        let key_bytes = be32(b, 108);
        let spec = Spec::parse(&cipher_name, &cipher_mode, key_bytes)?;
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_salt = [0u8; SALT_LEN];
        mk_salt.copy_from_slice(&b[132..164]);
        let mk_iters = be32(b, 164);
        if mk_iters == 0 {
            return Err("LUKS header has zero master key iterations".into());
        }
        let mut uuid = [0u8; 40];
        uuid.copy_from_slice(&b[168..208]);
        let mut slots = Vec::with_capacity(NUM_SLOTS);
        let split_bytes = u64::from(key_bytes) * u64::from(STRIPES);
        for i in 0..NUM_SLOTS {
            let s = &b[208 + i * 48..208 + (i + 1) * 48];
            let state = be32(s, 0);
            if state != SLOT_ACTIVE && state != SLOT_DISABLED {
                return Err(format!("Keyslot {i} state (active/disable) is corrupted"));
            }
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&s[8..40]);
            let slot = Slot {
                active: state == SLOT_ACTIVE,
                iterations: be32(s, 4),
                salt,
                key_offset: be32(s, 40),
                stripes: be32(s, 44),
            };
            if slot.active && slot.iterations == 0 {
                return Err(format!("Keyslot {i} is corrupted (zero iterations)"));
            }
            if slot.stripes != STRIPES {
                return Err(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    slot.stripes
                ));
            }
            let start = u64::from(slot.key_offset) * SECTOR;
            let end = start + split_bytes.div_ceil(SECTOR) * SECTOR;
            if start < HEADER_LEN as u64 || end > u64::from(payload_offset) * SECTOR {
                return Err(format!(
                    "Keyslot {i} is overlapping with the LUKS header or the encrypted payload"
                ));
            }
            slots.push(slot);
        }
        Ok(Header {
            spec,
            cipher_name,
            hash,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iters,
            uuid,
            slots,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        let put =
            |b: &mut [u8], at: usize, s: &str| b[at..at + s.len()].copy_from_slice(s.as_bytes());
        put(&mut b, 8, &self.cipher_name);
        put(&mut b, 40, &self.spec.mode_string());
        put(&mut b, 72, self.hash.name());
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iters.to_be_bytes());
        b[168..208].copy_from_slice(&self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + i * 48;
            let state = if s.active { SLOT_ACTIVE } else { SLOT_DISABLED };
            b[o..o + 4].copy_from_slice(&state.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// The payload's offset in bytes.
    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR
    }

    /// Length of a slot's key material, rounded up to whole sectors.
    pub fn material_len(&self) -> usize {
        (self.key_bytes as usize * STRIPES as usize).div_ceil(SECTOR as usize) * SECTOR as usize
    }

    /// The active slots' (index, offset of the key material in bytes).
    pub fn active_slots(&self) -> Vec<(usize, u64)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active)
            .map(|(i, s)| (i, u64::from(s.key_offset) * SECTOR))
            .collect()
    }

    /// Tries `password` on slot `i` whose key material is `material`:
    /// the master key if it matches the digest.
    pub fn try_slot(&self, i: usize, password: &[u8], material: &[u8]) -> Option<Vec<u8>> {
        let s = &self.slots[i];
        let kb = self.key_bytes as usize;
        let mut split_key = vec![0u8; kb];
        self.hash
            .pbkdf2(password, &s.salt, s.iterations, &mut split_key);
        let mut m = material.to_vec();
        Cipher::new(&self.spec, &split_key).decrypt(&mut m, 0);
        wipe(&mut split_key);
        let mk = af_merge(self.hash, &m[..kb * STRIPES as usize], kb, STRIPES as usize);
        wipe(&mut m);
        let mut digest = [0u8; DIGEST_LEN];
        self.hash
            .pbkdf2(&mk, &self.mk_salt, self.mk_iters, &mut digest);
        (digest == self.mk_digest).then_some(mk)
    }
}

/// Overwrites key material before it is freed.
pub fn wipe(b: &mut [u8]) {
    for x in b.iter_mut() {
        // SAFETY: `x` is a valid exclusive reference; the volatile store
        // keeps the compiler from removing the wipe.
        unsafe { std::ptr::write_volatile(x, 0) };
    }
}

fn xor(d: &mut [u8], s: &[u8]) {
    for (a, b) in d.iter_mut().zip(s) {
        *a ^= b;
    }
}

/// The AF diffusion: each hash-sized block of `b` replaced by the hash of
/// its index (big-endian) and itself, truncated for the last block.
fn diffuse(h: Hash, b: &mut [u8]) {
    for (i, c) in b.chunks_mut(h.len()).enumerate() {
        let d = h.digest(&[&(i as u32).to_be_bytes(), c]);
        let n = c.len();
        c.copy_from_slice(&d[..n]);
    }
}

/// Anti-forensic merge of `stripes` blocks of `len` bytes.
fn af_merge(h: Hash, src: &[u8], len: usize, stripes: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    for i in 0..stripes - 1 {
        xor(&mut d, &src[i * len..(i + 1) * len]);
        diffuse(h, &mut d);
    }
    xor(&mut d, &src[(stripes - 1) * len..stripes * len]);
    d
}

/// Anti-forensic split of `key` into `stripes` blocks (random ones, and
/// the last that makes them merge to `key`).
fn af_split(h: Hash, key: &[u8], stripes: usize) -> Result<Vec<u8>, String> {
    let len = key.len();
    let mut out = vec![0u8; len * stripes];
    random(&mut out[..len * (stripes - 1)])?;
    let mut d = vec![0u8; len];
    for i in 0..stripes - 1 {
        xor(&mut d, &out[i * len..(i + 1) * len]);
        diffuse(h, &mut d);
    }
    xor(&mut d, key);
    out[(stripes - 1) * len..].copy_from_slice(&d);
    wipe(&mut d);
    Ok(out)
}

/// Random bytes from the kernel (getrandom(2)).
pub fn random(buf: &mut [u8]) -> Result<(), String> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of
        // `buf`, which we own exclusively.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("Unable to read random bytes: {e}"));
        }
        done += r as usize;
    }
    Ok(())
}

/// PBKDF2 iterations for `iter_time_ms` on this machine (QEMU's
/// qcrypto_pbkdf2_count_iters: time a run, scale).
fn count_iters(h: Hash, iter_time_ms: u64) -> u64 {
    let mut iters: u32 = 1 << 12;
    let mut out = [0u8; DIGEST_LEN];
    loop {
        let t = std::time::Instant::now();
        h.pbkdf2(b"benchmark password", &[0u8; SALT_LEN], iters, &mut out);
        let ms = t.elapsed().as_millis() as u64;
        if ms >= 20 || iters >= 1 << 28 {
            return u64::from(iters) * iter_time_ms / ms.max(1);
        }
        iters *= 2;
    }
}

/// What blockdev-create's luks options and qemu-img's `-o` give.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub spec: Spec,
    pub hash: Hash,
    /// Milliseconds of PBKDF2 for the key slot (QEMU's iter-time, default 2000).
    pub iter_time: u64,
}

impl Default for CreateSpec {
    fn default() -> Self {
        CreateSpec {
            spec: Spec {
                aes_key: 32,
                mode: Mode::Xts,
                ivgen: IvGen::Plain64,
            },
            hash: Hash::Sha256,
            iter_time: 2000,
        }
    }
}

impl CreateSpec {
    /// Applies QEMU's option values (cipher-alg aes-128|aes-256,
    /// cipher-mode xts|cbc, ivgen-alg plain|plain64|essiv, ivgen-hash-alg,
    /// hash-alg sha1|sha256, iter-time); `ivgen-hash-alg` defaults to
    /// sha256 as in QEMU.
    pub fn from_options(
        cipher_alg: Option<&str>,
        cipher_mode: Option<&str>,
        ivgen_alg: Option<&str>,
        ivgen_hash_alg: Option<&str>,
        hash_alg: Option<&str>,
        iter_time: Option<u64>,
    ) -> Result<CreateSpec, String> {
        let mut c = CreateSpec::default();
        if let Some(a) = cipher_alg {
            c.spec.aes_key = match a {
                "aes-128" => 16,
                "aes-256" => 32,
                _ => return Err(format!("Cipher algorithm '{a}' is not supported")),
            };
        }
        if let Some(m) = cipher_mode {
            c.spec.mode = match m {
                "xts" => Mode::Xts,
                "cbc" => Mode::Cbc,
                _ => return Err(format!("Cipher mode '{m}' is not supported")),
            };
        }
        if let Some(h) = hash_alg {
            c.hash = Hash::parse(h)?;
        }
        if let Some(iv) = ivgen_alg {
            c.spec.ivgen = match iv {
                "plain" => IvGen::Plain,
                "plain64" => IvGen::Plain64,
                "essiv" => {
                    let h = Hash::parse(ivgen_hash_alg.unwrap_or("sha256"))?;
                    if h != Hash::Sha256 {
                        return Err(format!(
                            "Cipher 'aes' cannot take an ESSIV key from '{}'",
                            h.name()
                        ));
                    }
                    IvGen::Essiv(h)
                }
                _ => return Err(format!("IV generator '{iv}' is not supported")),
            };
        }
        if let Some(t) = iter_time {
            if t == 0 {
                return Err("iter-time must be at least 1 ms".into());
            }
            c.iter_time = t;
        }
        Ok(c)
    }
}

/// A new LUKS1 volume: its header and slot 0's key material (both to be
/// written at offset 0 of the file), and the payload offset in bytes.
pub struct NewVolume {
    pub head: Vec<u8>,
    pub payload: u64,
    pub master_key: Vec<u8>,
}

impl Drop for NewVolume {
    fn drop(&mut self) {
        wipe(&mut self.master_key);
    }
}

/// Lays out a new volume as QEMU's qcrypto_block_luks_create does: the
/// header in the first 4 KiB, eight key slots' material after it, each
/// 4 KiB aligned, the payload after them; slot 0 holds `password`.
pub fn create(c: &CreateSpec, password: &[u8]) -> Result<NewVolume, String> {
    let kb = c.spec.key_bytes();
    let mut master_key = vec![0u8; kb];
    random(&mut master_key)?;
    let mut mk_salt = [0u8; SALT_LEN];
    random(&mut mk_salt)?;
    let rate = count_iters(c.hash, 1000);
    let mk_iters = (rate.saturating_mul(c.iter_time) / 1000 / 8)
        .max(MIN_MK_ITERS)
        .min(u64::from(u32::MAX)) as u32;
    let mut mk_digest = [0u8; DIGEST_LEN];
    c.hash
        .pbkdf2(&master_key, &mk_salt, mk_iters, &mut mk_digest);
    let split_len = kb as u64 * u64::from(STRIPES);
    let split_sectors = split_len.div_ceil(KEY_SLOT_ALIGN) * KEY_SLOT_ALIGN / SECTOR;
    let header_sectors = KEY_SLOT_ALIGN / SECTOR;
    let mut slots = Vec::with_capacity(NUM_SLOTS);
    for i in 0..NUM_SLOTS as u64 {
        slots.push(Slot {
            active: false,
            iterations: 0,
            salt: [0u8; SALT_LEN],
            key_offset: (header_sectors + i * split_sectors) as u32,
            stripes: STRIPES,
        });
    }
    let payload_offset = (header_sectors + NUM_SLOTS as u64 * split_sectors) as u32;
    let slot_iters = (rate.saturating_mul(c.iter_time) / 1000)
        .max(MIN_SLOT_ITERS)
        .min(u64::from(u32::MAX)) as u32;
    let mut salt = [0u8; SALT_LEN];
    random(&mut salt)?;
    slots[0].active = true;
    slots[0].iterations = slot_iters;
    slots[0].salt = salt;
    let mut uuid_bytes = [0u8; 16];
    random(&mut uuid_bytes)?;
    uuid_bytes[6] = (uuid_bytes[6] & 0x0f) | 0x40;
    uuid_bytes[8] = (uuid_bytes[8] & 0x3f) | 0x80;
    let hex: String = uuid_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let uuid_s = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    let mut uuid = [0u8; 40];
    uuid[..36].copy_from_slice(uuid_s.as_bytes());
    let header = Header {
        spec: c.spec,
        cipher_name: "aes".into(),
        hash: c.hash,
        payload_offset,
        key_bytes: kb as u32,
        mk_digest,
        mk_salt,
        mk_iters,
        uuid,
        slots,
    };
    // Slot 0's material: the split master key encrypted with the key
    // derived from the passphrase.
    let mut split_key = vec![0u8; kb];
    c.hash.pbkdf2(password, &salt, slot_iters, &mut split_key);
    let mut material = af_split(c.hash, &master_key, STRIPES as usize)?;
    material.resize(header.material_len(), 0);
    Cipher::new(&c.spec, &split_key).encrypt(&mut material, 0);
    wipe(&mut split_key);
    let first = u64::from(header.slots[0].key_offset) * SECTOR;
    let mut head = header.encode();
    head.resize(first as usize, 0);
    head.extend_from_slice(&material);
    wipe(&mut material);
    Ok(NewVolume {
        head,
        payload: header.payload_bytes(),
        master_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> CreateSpec {
        CreateSpec {
            iter_time: 1,
            ..CreateSpec::default()
        }
    }

    #[test]
    fn a_new_volume_opens_with_its_passphrase_only() {
        for (mode, iv, aes_key) in [
            (Mode::Xts, IvGen::Plain64, 32),
            (Mode::Xts, IvGen::Plain64, 16),
            (Mode::Cbc, IvGen::Essiv(Hash::Sha256), 32),
            (Mode::Cbc, IvGen::Plain64, 16),
        ] {
            for hash in [Hash::Sha256, Hash::Sha1] {
                let c = CreateSpec {
                    spec: Spec {
                        aes_key,
                        mode,
                        ivgen: iv,
                    },
                    hash,
                    ..quick()
                };
                let v = create(&c, b"pass").unwrap();
                let h = Header::parse(&v.head).unwrap();
                assert_eq!(h.payload_bytes(), v.payload);
                let slots = h.active_slots();
                assert_eq!(slots.len(), 1);
                let (i, off) = slots[0];
                let m = &v.head[off as usize..off as usize + h.material_len()];
                assert_eq!(
                    h.try_slot(i, b"pass", m).as_deref(),
                    Some(&v.master_key[..])
                );
                assert!(h.try_slot(i, b"Pass", m).is_none());
            }
        }
    }

    #[test]
    fn sectors_round_trip_and_depend_on_the_sector_number() {
        for spec in [
            Spec {
                aes_key: 32,
                mode: Mode::Xts,
                ivgen: IvGen::Plain64,
            },
            Spec {
                aes_key: 16,
                mode: Mode::Cbc,
                ivgen: IvGen::Essiv(Hash::Sha256),
            },
        ] {
            let key: Vec<u8> = (0..spec.key_bytes() as u8).collect();
            let c = Cipher::new(&spec, &key);
            let plain: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
            let mut a = plain.clone();
            c.encrypt(&mut a, 5);
            assert_ne!(a, plain);
            let mut b = plain[512..].to_vec();
            c.encrypt(&mut b, 6);
            assert_eq!(&a[512..], &b[..]);
            c.decrypt(&mut a, 5);
            assert_eq!(a, plain);
        }
    }

    #[test]
    fn xts_agrees_with_the_xts_mode_crate() {
        use xts_mode::{get_tweak_default, Xts128};
        for kl in [16usize, 32] {
            let key: Vec<u8> = (0..2 * kl as u8).map(|i| i.wrapping_mul(37)).collect();
            let spec = Spec {
                aes_key: kl,
                mode: Mode::Xts,
                ivgen: IvGen::Plain64,
            };
            let ours = Cipher::new(&spec, &key);
            let plain: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 5) as u8).collect();
            let mut a = plain.clone();
            ours.encrypt(&mut a, 0x1234_5678_9abc);
            let mut b = plain.clone();
            if kl == 16 {
                let x = Xts128::new(aes128(&key[..16]), aes128(&key[16..]));
                x.encrypt_area(&mut b, 512, 0x1234_5678_9abc, get_tweak_default);
            } else {
                let x = Xts128::new(aes256(&key[..32]), aes256(&key[32..]));
                x.encrypt_area(&mut b, 512, 0x1234_5678_9abc, get_tweak_default);
            }
            assert_eq!(a, b, "aes-{}", kl * 8);
            ours.decrypt(&mut a, 0x1234_5678_9abc);
            assert_eq!(a, plain);
        }
    }

    #[test]
    fn corrupt_headers_are_refused_without_panicking() {
        let v = create(&quick(), b"x").unwrap();
        assert!(Header::parse(&v.head[..100]).is_err());
        let mut b = v.head.clone();
        b[7] = 2;
        assert_eq!(
            Header::parse(&b).unwrap_err(),
            "LUKS version 2 is not supported"
        );
        for at in 0..HEADER_LEN {
            let mut b = v.head.clone();
            b[at] ^= 0xff;
            let _ = Header::parse(&b).map(|h| h.material_len());
        }
    }
}
