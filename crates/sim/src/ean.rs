//! EAN-13 check digits: computing them for generated codes and validating
//! codes (products' `ean13`, customers' `loyalty_card`).

/// The check digit of an EAN-13 whose first 12 digits are `first12`.
///
/// Weights alternate 1, 3, 1, 3… from the left over the 12 digits; the check
/// digit brings the weighted sum to a multiple of 10. Non-digit characters are
/// ignored and fewer or more than 12 digits are weighted the same way, so
/// callers that need a real code must pass exactly 12 ASCII digits (see
/// [`is_valid_ean13`]).
pub fn ean13_check_digit(first12: &str) -> u8 {
    let sum: u32 = first12
        .bytes()
        .filter(u8::is_ascii_digit)
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                d
            } else {
                3 * d
            }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// True when `code` is exactly 13 ASCII digits whose last digit is the
/// correct check digit.
pub fn is_valid_ean13(code: &str) -> bool {
    code.len() == 13
        && code.bytes().all(|b| b.is_ascii_digit())
        && code.as_bytes()[12] - b'0' == ean13_check_digit(&code[..12])
}

/// Appends the check digit to 12 digits. `first12` must be 12 ASCII digits.
pub(crate) fn with_check_digit(first12: String) -> String {
    debug_assert_eq!(first12.len(), 12);
    let check = ean13_check_digit(&first12);
    format!("{first12}{check}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes() {
        // Published examples: Wikipedia's EAN-13 example and a French product.
        assert_eq!(ean13_check_digit("400638133393"), 1);
        assert!(is_valid_ean13("4006381333931"));
        assert!(is_valid_ean13("3017620422003"));
        assert!(!is_valid_ean13("3017620422004"));
        assert!(!is_valid_ean13("301762042200"));
        assert!(!is_valid_ean13("30176204220a3"));
        assert_eq!(with_check_digit("000000000000".into()), "0000000000000");
    }
}
