#!/bin/sh
# Create the mosquitto password file for cerebellumd's roles (see ./acl):
#   make-passwd.sh /etc/mosquitto/cerebellumd.passwd            # asks for each password
# Non-interactive (provisioning): set the passwords in the environment, e.g.
#   CEREBELLUMD_PASSWORD=... OPERATOR_PASSWORD=... VIEWER_PASSWORD=... make-passwd.sh FILE
# A role's user is skipped when running non-interactively without its variable.
# Afterwards put the daemon's password in the file named by [mqtt] password_file of
# /etc/cerebellumd/cerebellumd.toml (mode 0640, group cerebellumd).
set -eu

file=${1:?usage: make-passwd.sh PASSWORD_FILE}
command -v mosquitto_passwd >/dev/null || { echo "mosquitto_passwd not found (apt install mosquitto)" >&2; exit 1; }

umask 077
: > "$file"
batch=${CEREBELLUMD_PASSWORD+x}${OPERATOR_PASSWORD+x}${VIEWER_PASSWORD+x}

add() {
    user=$1 password=$2
    if [ -n "$batch" ]; then
        [ -n "$password" ] || { echo "skipping $user (no password given)"; return 0; }
        mosquitto_passwd -b "$file" "$user" "$password"
    else
        echo "password for $user:"
        mosquitto_passwd "$file" "$user"
    fi
}

add cerebellumd "${CEREBELLUMD_PASSWORD:-}"
add operator "${OPERATOR_PASSWORD:-}"
add viewer "${VIEWER_PASSWORD:-}"

# The broker drops root for the `mosquitto` user: let it read the file.
if id mosquitto >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    chown root:mosquitto "$file" && chmod 0640 "$file"
fi
echo "wrote $file"
