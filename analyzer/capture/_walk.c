/*
 * The hot loop of analyzer/capture/engine.py (_walk_ethernet_pcap) in C: one call walks the libpcap
 * records of one buffer and does, record for record, exactly what the Python loop does. The
 * flow tables stay Python dicts of Python lists, and everything but the common case (Ethernet,
 * option-less unfragmented IPv4, TCP or UDP) goes to the same Python callables the Python loop
 * calls, so both paths produce the same state; tests compare them on every corpus capture.
 *
 * Everything read from the buffer is bounds-checked against the record and the buffer: the
 * input is attacker-controlled.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define WALK_ABI 4
#define FAST_SIZE 64 /* record header + the frame bytes the fast test reads (Python's struct) */

/* Attribute names, interned once: PyObject_GetAttrString would make a new string per call,
 * and the type attribute cache keeps a reference to each one it sees. */
static PyObject *s_pairs, *s_max_peers, *s_compact_at, *s_frac_per_second, *s_activity_start,
    *s_activity_shift, *s_fold_flow, *s_compact, *s_add_activity, *s_exchanged, *s_packets,
    *s_bytes, *s_first, *s_last, *s_protocols, *s_ports, *s_tcp, *s_opened_ports, *s_activity,
    *s_add, *s_udp, *s_roll, *s_inspect_tcp, *s_names, *s_dns_message, *s_add_frame;

static inline uint32_t
read_u32(const unsigned char *p, int big_endian)
{
    if (big_endian)
        return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}

/* entry[index] as a long long; -1 with an exception set if it is not an int */
static inline long long
entry_ll(PyObject *entry, Py_ssize_t index)
{
    return PyLong_AsLongLong(PyList_GET_ITEM(entry, index));
}

/* entry[index] = value (a new reference, stolen); 0 on success */
static inline int
entry_set(PyObject *entry, Py_ssize_t index, PyObject *value)
{
    if (value == NULL)
        return -1;
    PyObject *old = PyList_GET_ITEM(entry, index);
    PyList_SET_ITEM(entry, index, value);
    Py_DECREF(old);
    return 0;
}

/* A new flow entry: [1, orig, sec, frac, sec, frac, flags, flags, sec] (one sec object, as
 * the Python loop's list display shares it). */
static PyObject *
new_entry(uint32_t sec, uint32_t frac, uint32_t orig, long flags)
{
    PyObject *entry = PyList_New(9);
    if (entry == NULL)
        return NULL;
    PyObject *psec = NULL, *pfrac = NULL, *porig = NULL, *pflags = NULL, *one = NULL;
    if (!(psec = PyLong_FromUnsignedLong(sec)) || !(pfrac = PyLong_FromUnsignedLong(frac)) ||
        !(porig = PyLong_FromUnsignedLong(orig)) || !(pflags = PyLong_FromLong(flags)) ||
        !(one = PyLong_FromLong(1))) {
        Py_XDECREF(psec);
        Py_XDECREF(pfrac);
        Py_XDECREF(porig);
        Py_XDECREF(pflags);
        Py_XDECREF(one);
        Py_DECREF(entry);
        return NULL;
    }
    PyList_SET_ITEM(entry, 0, one);
    PyList_SET_ITEM(entry, 1, porig);
    Py_INCREF(psec);
    PyList_SET_ITEM(entry, 2, psec);
    Py_INCREF(pfrac);
    PyList_SET_ITEM(entry, 3, pfrac);
    Py_INCREF(psec);
    PyList_SET_ITEM(entry, 4, psec);
    PyList_SET_ITEM(entry, 5, pfrac);
    Py_INCREF(pflags);
    PyList_SET_ITEM(entry, 6, pflags);
    PyList_SET_ITEM(entry, 7, pflags);
    PyList_SET_ITEM(entry, 8, psec);
    return entry;
}

/* The flows one scan() call has touched lately, kept in C: a packet of a flow found here
 * changes C numbers only, not Python ints, and no key bytes object is made for it. A slot's
 * numbers are written back to its entry (the Python list) before anything reads the entry:
 * before roll() is called on it, before add_frame() (whose general path counts packets in
 * the same tables, and may fold them), when the slot is taken by another flow, and when
 * scan() returns. The entry a slot holds is the one the dict holds for its key, as
 * inspect_tcp() and dns_message() never touch the flow tables. */
#define CACHE_SLOTS 1024 /* a power of two */

typedef struct {
    PyObject *entry;      /* the flow's entry (a strong reference); NULL when the slot is free */
    int is_tcp;
    int dirty;            /* numbers changed since the entry was read or written */
    Py_ssize_t keylen;
    long long packets, bytes, flags, span_last;
    uint32_t last_sec, last_frac;
    unsigned char key[36];
} Slot;

/* What one scan() call works with: the accumulator's tables and methods, and the settings. */
typedef struct {
    PyObject *tcp, *udp;                   /* the flow tables (dicts), refreshed after add_frame */
    PyObject *roll, *inspect_tcp, *dns;    /* acc.roll, acc.inspect_tcp, acc.names.dns_message */
    const unsigned char *tunnel_ports;     /* 65,536 flags: UDP ports left to decode() */
    const unsigned char *tier_types;       /* 65,536 flags: IPv6 and the VLAN tag types */
    Py_ssize_t inspected;                  /* NAME_INSPECTED_PACKETS */
    Slot *cache;                           /* CACHE_SLOTS slots */
    int used[CACHE_SLOTS];                 /* the slots holding a flow, in no order */
    int nused;
} Walk;

/* Write a slot's numbers back to its entry: packets, bytes, last time, the OR of flags. */
static int
slot_flush(Slot *s)
{
    if (!s->dirty)
        return 0;
    PyObject *e = s->entry;
    if (PyList_GET_SIZE(e) < 9) {
        PyErr_SetString(PyExc_TypeError, "scan: a flow entry shrank");
        return -1;
    }
    if (entry_set(e, 0, PyLong_FromLongLong(s->packets)) < 0 ||
        entry_set(e, 1, PyLong_FromLongLong(s->bytes)) < 0 ||
        entry_set(e, 4, PyLong_FromUnsignedLong(s->last_sec)) < 0 ||
        entry_set(e, 5, PyLong_FromUnsignedLong(s->last_frac)) < 0 ||
        entry_set(e, 6, PyLong_FromLongLong(s->flags)) < 0)
        return -1;
    s->dirty = 0;
    return 0;
}

/* Read an entry's numbers into a slot. */
static int
slot_load(Slot *s, PyObject *e)
{
    long long v[6];
    static const Py_ssize_t at[6] = {0, 1, 4, 5, 6, 8};
    for (int i = 0; i < 6; i++) {
        if ((v[i] = entry_ll(e, at[i])) == -1 && PyErr_Occurred())
            return -1;
    }
    s->packets = v[0];
    s->bytes = v[1];
    s->last_sec = (uint32_t)v[2];
    s->last_frac = (uint32_t)v[3];
    s->flags = v[4];
    s->span_last = v[5];
    s->dirty = 0;
    return 0;
}

/* Write every slot back to its entry and empty the cache (even when a write fails). */
static int
cache_flush(Walk *w)
{
    int status = 0;
    for (int i = 0; i < w->nused; i++) {
        Slot *s = &w->cache[w->used[i]];
        if (status == 0 && slot_flush(s) < 0)
            status = -1;
        Py_CLEAR(s->entry);
    }
    w->nused = 0;
    return status;
}

static inline Py_ssize_t
slot_of(const unsigned char *key, Py_ssize_t keylen, int is_tcp)
{
    uint64_t h = (uint64_t)is_tcp;
    for (Py_ssize_t i = 0; i + 4 <= keylen; i += 4) {
        uint32_t word;
        memcpy(&word, key + i, 4);
        h = (h ^ word) * 0x9E3779B97F4A7C15ULL;
    }
    return (Py_ssize_t)(h >> 54) & (CACHE_SLOTS - 1);
}

/* One packet of the flow ``k`` (``keylen`` bytes: src, dst, sport, dport) in the TCP or UDP
 * table (engine._Accumulator.count_packet): a new entry, or the existing one's span rolled
 * (in Python) if ``sec`` is past it, then packets, bytes, last time and the OR of TCP flags.
 * ``*key`` is the flow's key as a bytes object when one was made (NULL otherwise; the caller
 * owns it). Returns the flow's packets so far, -1 on error. */
static long long
count_flow(Walk *w, int is_tcp, const unsigned char *k, Py_ssize_t keylen, uint32_t sec,
           uint32_t frac, uint32_t orig, long flags, PyObject **key)
{
    Slot *s = &w->cache[slot_of(k, keylen, is_tcp)];
    if (!(s->entry != NULL && s->is_tcp == is_tcp && s->keylen == keylen &&
          memcmp(s->key, k, keylen) == 0)) {
        PyObject *table = is_tcp ? w->tcp : w->udp;
        if (!(*key = PyBytes_FromStringAndSize((const char *)k, keylen)))
            return -1;
        PyObject *entry = PyDict_GetItemWithError(table, *key);
        if (entry == NULL && PyErr_Occurred())
            return -1;
        int fresh = entry == NULL;
        if (fresh) {
            if (!(entry = new_entry(sec, frac, orig, flags)))
                return -1;
            int failed = PyDict_SetItem(table, *key, entry);
            if (failed) {
                Py_DECREF(entry);
                return -1;
            }
        } else {
            if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) < 9) {
                PyErr_SetString(PyExc_TypeError, "scan: a flow entry is not a list");
                return -1;
            }
            Py_INCREF(entry);
        }
        /* the slot's flow goes back to its entry before the slot takes this one */
        if (s->entry != NULL) {
            int failed = slot_flush(s);
            Py_CLEAR(s->entry);
            if (failed) {
                Py_DECREF(entry);
                return -1;
            }
        } else {
            w->used[w->nused++] = (int)(s - w->cache);
        }
        s->entry = entry;
        s->is_tcp = is_tcp;
        s->keylen = keylen;
        memcpy(s->key, k, keylen);
        if (fresh) {
            s->packets = 1;
            s->bytes = orig;
            s->last_sec = sec;
            s->last_frac = frac;
            s->flags = flags;
            s->span_last = sec;
            s->dirty = 0;
            return 1;
        }
        if (slot_load(s, entry) < 0)
            return -1;
    }
    if ((long long)sec > s->span_last) {
        if (slot_flush(s) < 0)
            return -1;
        PyObject *entry = Py_NewRef(s->entry); /* the roll callback runs Python code */
        PyObject *result = PyObject_CallFunction(w->roll, "Ok", entry, (unsigned long)sec);
        long long span_last = -1;
        if (result != NULL) {
            Py_DECREF(result);
            if (PyList_GET_SIZE(entry) < 9) /* roll only ever grows an entry */
                PyErr_SetString(PyExc_TypeError, "scan: roll shrank a flow entry");
            else
                span_last = entry_ll(entry, 8);
        }
        Py_DECREF(entry);
        if (PyErr_Occurred())
            return -1;
        s->span_last = span_last;
    }
    if (__builtin_add_overflow(s->packets, 1, &s->packets) ||
        __builtin_add_overflow(s->bytes, (long long)orig, &s->bytes)) { /* past any budget */
        PyErr_SetString(PyExc_OverflowError, "scan: a flow count passed 2**63");
        return -1;
    }
    s->last_sec = sec;
    s->last_frac = frac;
    s->flags |= flags;
    s->dirty = 1;
    return s->packets;
}

/* acc.inspect_tcp(key, dst, seq, buf[start:end], sport, sec) */
static int
inspect(Walk *w, PyObject *key, const unsigned char *dst, Py_ssize_t alen, uint32_t seq,
        const unsigned char *buf, Py_ssize_t start, Py_ssize_t end, unsigned sport, uint32_t sec)
{
    PyObject *payload = NULL, *result = NULL;
    PyObject *pdst = PyBytes_FromStringAndSize((const char *)dst, alen);
    if (pdst != NULL)
        payload = PyBytes_FromStringAndSize((const char *)buf + start, end - start);
    if (payload != NULL)
        result = PyObject_CallFunction(w->inspect_tcp, "OOkOIk", key, pdst, (unsigned long)seq,
                                       payload, sport, (unsigned long)sec);
    Py_XDECREF(pdst);
    Py_XDECREF(payload);
    Py_XDECREF(result);
    return result == NULL ? -1 : 0;
}

/* acc.names.dns_message(key, buf[start:end], sec): a query to or an answer from port 53 */
static int
dns_message(Walk *w, PyObject *key, const unsigned char *buf, Py_ssize_t start, Py_ssize_t end,
            uint32_t sec)
{
    PyObject *payload = PyBytes_FromStringAndSize((const char *)buf + start, end - start);
    if (payload == NULL)
        return -1;
    PyObject *result = PyObject_CallFunction(w->dns, "OOk", key, payload, (unsigned long)sec);
    Py_DECREF(payload);
    Py_XDECREF(result);
    return result == NULL ? -1 : 0;
}

/* The common case, as the Python loop's inline branch: Ethernet, option-less unfragmented
 * IPv4 (checked by the caller), TCP, or UDP on no tunnel port. 1 if taken, 0 if not, -1 on
 * error. */
static int
ipv4_fast(Walk *w, const unsigned char *buf, Py_ssize_t data, Py_ssize_t nxt, uint32_t sec,
          uint32_t frac, uint32_t orig)
{
    unsigned proto = buf[data + 23];
    const unsigned char *k = buf + data + 26; /* src, dst, sport, dport */
    unsigned sport = k[8] << 8 | k[9], dport = k[10] << 8 | k[11];
    int is_tcp = proto == 6;
    if (!is_tcp && !(proto == 17 && !w->tunnel_ports[dport] && !w->tunnel_ports[sport]))
        return 0;
    PyObject *key = NULL; /* made only for a look-up in the table or a callback */
    long long packets = count_flow(w, is_tcp, k, 12, sec, frac, orig,
                                   is_tcp ? buf[data + 47] : 0, &key);
    int status = packets < 0 ? -1 : 1;
    if (status > 0 && (is_tcp ? packets <= w->inspected : sport == 53 || dport == 53)) {
        /* the transport payload, clipped to the IP total length (engine._ipv4_payload) */
        Py_ssize_t total = buf[data + 16] << 8 | buf[data + 17];
        Py_ssize_t end = total && data + 14 + total < nxt ? data + 14 + total : nxt;
        Py_ssize_t start = data + (is_tcp ? 34 + (buf[data + 46] >> 4) * 4 : 42);
        if (start < end) {
            if (!key && !(key = PyBytes_FromStringAndSize((const char *)k, 12)))
                status = -1;
            else if (is_tcp && inspect(w, key, k + 4, 4, read_u32(buf + data + 38, 1), buf,
                                       start, end, sport, sec) < 0)
                status = -1;
            else if (!is_tcp && dns_message(w, key, buf, start, end, sec) < 0)
                status = -1;
        }
    }
    Py_XDECREF(key);
    return status;
}

/* The second tier (engine._Accumulator.fast_frame and _fast_transport): up to two VLAN tags
 * over option-less unfragmented IPv4, or IPv6 without extension headers, carrying TCP, or UDP
 * on no tunnel port. 1 if taken, 0 to leave the frame to decode(), -1 on error. */
static int
second_tier(Walk *w, const unsigned char *buf, Py_ssize_t data, Py_ssize_t nxt, uint32_t sec,
            uint32_t frac, uint32_t orig)
{
    Py_ssize_t at = data + 12;
    unsigned ethertype = buf[at] << 8 | buf[at + 1];
    at += 2;
    for (int tags = 0; tags < 2; tags++) {
        if (ethertype == 0x86DD || !w->tier_types[ethertype]) /* not a VLAN tag (VLAN_TAGS) */
            break;
        if (at + 4 > nxt)
            return 0;
        ethertype = buf[at + 2] << 8 | buf[at + 3];
        at += 4;
    }
    Py_ssize_t alen, end;
    unsigned proto;
    if (ethertype == 0x0800) {
        if (nxt - at < 20 || buf[at] != 0x45 || (buf[at + 6] & 0x3F) || buf[at + 7])
            return 0;
        Py_ssize_t total = buf[at + 2] << 8 | buf[at + 3];
        if (total && total < 20)
            return 0;
        end = total && at + total < nxt ? at + total : nxt;
        alen = 4;
        proto = buf[at + 9];
        at += 12; /* the addresses */
    } else if (ethertype == 0x86DD) {
        if (nxt - at < 40 || buf[at] >> 4 != 6)
            return 0;
        Py_ssize_t payload_len = buf[at + 4] << 8 | buf[at + 5];
        if (!payload_len)
            return 0;
        end = at + 40 + payload_len < nxt ? at + 40 + payload_len : nxt;
        alen = 16;
        proto = buf[at + 6];
        at += 8;
    } else {
        return 0;
    }
    const unsigned char *src = buf + at;
    Py_ssize_t transport = at + 2 * alen;
    long flags;
    int is_tcp = proto == 6;
    if (is_tcp) {
        if (end - transport < 20)
            return 0;
        flags = buf[transport + 13];
    } else if (proto == 17) {
        if (end - transport < 8)
            return 0;
        unsigned sport = buf[transport] << 8 | buf[transport + 1];
        unsigned dport = buf[transport + 2] << 8 | buf[transport + 3];
        if (w->tunnel_ports[sport] || w->tunnel_ports[dport])
            return 0;
        Py_ssize_t udp_length = buf[transport + 4] << 8 | buf[transport + 5];
        if (8 <= udp_length && udp_length < end - transport) /* padding after the datagram */
            end = transport + udp_length;
        flags = 0;
    } else {
        return 0;
    }
    unsigned char keybuf[36];
    memcpy(keybuf, src, 2 * alen);
    memcpy(keybuf + 2 * alen, buf + transport, 4);
    Py_ssize_t keylen = 2 * alen + 4;
    PyObject *key = NULL; /* made only for a look-up in the table or a callback */
    long long packets = count_flow(w, is_tcp, keybuf, keylen, sec, frac, orig, flags, &key);
    int status = packets < 0 ? -1 : 1;
    unsigned sport = buf[transport] << 8 | buf[transport + 1];
    unsigned dport = buf[transport + 2] << 8 | buf[transport + 3];
    if (status > 0 && is_tcp && packets <= w->inspected) {
        Py_ssize_t offset = (buf[transport + 12] >> 4) * 4;
        if (offset >= 20 && transport + offset < end &&
            ((!key && !(key = PyBytes_FromStringAndSize((const char *)keybuf, keylen))) ||
             inspect(w, key, src + alen, alen, read_u32(buf + transport + 4, 1), buf,
                     transport + offset, end, sport, sec) < 0))
            status = -1;
    } else if (status > 0 && !is_tcp && (sport == 53 || dport == 53) && transport + 8 < end) {
        if ((!key && !(key = PyBytes_FromStringAndSize((const char *)keybuf, keylen))) ||
            dns_message(w, key, buf, transport + 8, end, sec) < 0)
            status = -1;
    }
    Py_XDECREF(key);
    return status;
}

PyDoc_STRVAR(scan_doc,
"scan(buf, pos, end, left, max_record, big_endian, acc, tunnel_ports, second_tier,\n"
"     inspected_packets) -> (pos, taken, damaged_incl)\n\n"
"Walk the libpcap records in buf[pos:end] as engine._walk_ethernet_pcap's inner loop does,\n"
"at most ``left`` of them. Returns where the walk stopped, how many records it consumed and\n"
"the length field of a damaged record there (-1 when none).");

static PyObject *
scan(PyObject *module, PyObject *args)
{
    PyObject *bufobj, *acc;
    Py_ssize_t pos, end, left, max_record, inspected;
    int big_endian;
    Py_buffer tunnel, tier;
    if (!PyArg_ParseTuple(args, "O!nnnnpOy*y*n", &PyByteArray_Type, &bufobj, &pos, &end, &left,
                          &max_record, &big_endian, &acc, &tunnel, &tier, &inspected))
        return NULL;
    PyObject *result = NULL, *names = NULL, *add_frame = NULL, *link = NULL;
    Walk w = {NULL, NULL, NULL, NULL, NULL, tunnel.buf, tier.buf, inspected, NULL, {0}, 0};
    /* An export of the buffer for the whole call: Python code run from here (roll, add_frame)
     * cannot resize it under the pointers taken into it. */
    Py_buffer pinned = {0};
    if (!PyByteArray_CheckExact(bufobj) || PyObject_GetBuffer(bufobj, &pinned, PyBUF_SIMPLE) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "scan: buf must be a bytearray");
        PyBuffer_Release(&tunnel);
        PyBuffer_Release(&tier);
        return NULL;
    }
    if (tunnel.len != 65536 || tier.len != 65536 || pos < 0 || end < pos || max_record < 0 ||
        end > pinned.len) {
        PyErr_SetString(PyExc_ValueError, "scan: bad buffer bounds, limit or port tables");
        goto done;
    }
    const unsigned char *buf = pinned.buf;
    if (!(w.tcp = PyObject_GetAttr(acc, s_tcp)) ||
        !(w.udp = PyObject_GetAttr(acc, s_udp)) ||
        !(w.roll = PyObject_GetAttr(acc, s_roll)) ||
        !(w.inspect_tcp = PyObject_GetAttr(acc, s_inspect_tcp)) ||
        !(names = PyObject_GetAttr(acc, s_names)) ||
        !(w.dns = PyObject_GetAttr(names, s_dns_message)) ||
        !(add_frame = PyObject_GetAttr(acc, s_add_frame)) || !(link = PyLong_FromLong(1)))
        goto done;
    if (!PyDict_CheckExact(w.tcp) || !PyDict_CheckExact(w.udp)) {
        PyErr_SetString(PyExc_TypeError, "scan: flow tables must be dicts");
        goto done;
    }
    if (!(w.cache = PyMem_Calloc(CACHE_SLOTS, sizeof(Slot)))) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t taken = 0;
    long long damaged = -1;
    for (; taken < left; taken++) {
        if (pos + 16 > end)
            break;
        uint32_t sec = read_u32(buf + pos, big_endian);
        uint32_t frac = read_u32(buf + pos + 4, big_endian);
        uint32_t incl = read_u32(buf + pos + 8, big_endian);
        uint32_t orig = read_u32(buf + pos + 12, big_endian);
        if ((uint64_t)incl > (uint64_t)max_record) {
            damaged = incl;
            break;
        }
        Py_ssize_t data = pos + 16;
        if ((uint64_t)incl > (uint64_t)(end - data))
            break; /* the rest of the record is in the next chunk */
        Py_ssize_t nxt = data + (Py_ssize_t)incl;
        /* The Python loop reads the fast fields only when they fit in the buffer (they may
         * lie past a short frame, as here); else the record goes to decode(). */
        int taken_here = 0;
        if (pos + FAST_SIZE <= end) {
            unsigned ethertype = buf[data + 12] << 8 | buf[data + 13];
            if (ethertype == 0x0800) {
                unsigned total_len = buf[data + 16] << 8 | buf[data + 17];
                unsigned frag = buf[data + 20] << 8 | buf[data + 21];
                if (buf[data + 14] == 0x45 && incl >= 48 && !(frag & 0x3FFF) &&
                    (total_len >= 20 || total_len == 0))
                    taken_here = ipv4_fast(&w, buf, data, nxt, sec, frac, orig);
            } else if (w.tier_types[ethertype]) {
                taken_here = second_tier(&w, buf, data, nxt, sec, frac, orig);
            }
        }
        if (taken_here < 0)
            goto done;
        if (!taken_here) {
            /* the general path counts packets in the same tables, and may fold them */
            if (cache_flush(&w) < 0)
                goto done;
            PyObject *frame = PyBytes_FromStringAndSize((const char *)buf + data, nxt - data);
            if (frame == NULL)
                goto done;
            PyObject *r = PyObject_CallFunction(add_frame, "OkkkO", link, (unsigned long)sec,
                                                (unsigned long)frac, (unsigned long)orig, frame);
            Py_DECREF(frame);
            if (r == NULL)
                goto done;
            Py_DECREF(r);
            /* the general path may have folded the flow tables into new ones */
            PyObject *now_tcp = PyObject_GetAttr(acc, s_tcp);
            PyObject *now_udp = now_tcp == NULL ? NULL : PyObject_GetAttr(acc, s_udp);
            if (now_tcp == NULL || now_udp == NULL || !PyDict_CheckExact(now_tcp) ||
                !PyDict_CheckExact(now_udp)) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError, "scan: flow tables must be dicts");
                Py_XDECREF(now_tcp);
                Py_XDECREF(now_udp);
                goto done;
            }
            Py_SETREF(w.tcp, now_tcp);
            Py_SETREF(w.udp, now_udp);
        }
        pos = nxt;
    }
    if (cache_flush(&w) < 0)
        goto done;
    result = Py_BuildValue("nnL", pos, taken, damaged);
done:
    if (w.cache != NULL) {
        /* after an error too, the entries get what was counted, as the Python loop's have */
        if (w.nused) {
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            if (cache_flush(&w) < 0)
                PyErr_Clear(); /* the first error is the one to report */
            PyErr_Restore(type, value, traceback);
        }
        PyMem_Free(w.cache);
    }
    Py_XDECREF(w.tcp);
    Py_XDECREF(w.udp);
    Py_XDECREF(w.roll);
    Py_XDECREF(w.inspect_tcp);
    Py_XDECREF(w.dns);
    Py_XDECREF(names);
    Py_XDECREF(add_frame);
    Py_XDECREF(link);
    PyBuffer_Release(&tunnel);
    PyBuffer_Release(&tier);
    PyBuffer_Release(&pinned);
    return result;
}


/* ---- folding flows into address pairs (engine._Accumulator._fold_table) ------------------ */


#define PORTS_TRACKED 512
#define SPLIT_BYTES 9
#define F_SYN 0x02
#define F_RST 0x04
#define F_ACK 0x10

static long long
attr_ll(PyObject *object, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(object, name);
    if (value == NULL)
        return -1;
    long long result = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return result;
}

/* list[index] += delta, for a list of Python ints */
static int
list_add(PyObject *list, Py_ssize_t index, PyObject *delta)
{
    if (!PyList_CheckExact(list) || PyList_GET_SIZE(list) <= index) {
        PyErr_SetString(PyExc_TypeError, "fold_flows: expected a list of counts");
        return -1;
    }
    PyObject *sum = PyNumber_Add(PyList_GET_ITEM(list, index), delta);
    return entry_set(list, index, sum);
}

/* mapping[key] = mapping.get(key, 0) + delta */
static int
dict_add(PyObject *mapping, PyObject *key, PyObject *delta)
{
    PyObject *old = PyDict_GetItemWithError(mapping, key);
    if (old == NULL && PyErr_Occurred())
        return -1;
    PyObject *sum = old == NULL ? Py_NewRef(delta) : PyNumber_Add(old, delta);
    if (sum == NULL)
        return -1;
    int failed = PyDict_SetItem(mapping, key, sum);
    Py_DECREF(sum);
    return failed;
}

/* the flow the other way: dst + src + dport + sport; a borrowed reference or NULL */
static PyObject *
reverse_flow(PyObject *table, const unsigned char *k, Py_ssize_t alen, int *failed)
{
    unsigned char reversed[36];
    memcpy(reversed, k + alen, alen);
    memcpy(reversed + alen, k, alen);
    memcpy(reversed + 2 * alen, k + 2 * alen + 2, 2);
    memcpy(reversed + 2 * alen + 2, k + 2 * alen, 2);
    PyObject *key = PyBytes_FromStringAndSize((const char *)reversed, 2 * alen + 4);
    if (key == NULL) {
        *failed = 1;
        return NULL;
    }
    PyObject *entry = PyDict_GetItemWithError(table, key);
    Py_DECREF(key);
    if (entry == NULL && PyErr_Occurred())
        *failed = 1;
    return entry;
}

static long long
flags_of(PyObject *entry)
{
    if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) < 9) {
        PyErr_SetString(PyExc_TypeError, "fold_flows: a flow entry is not a list");
        return -1;
    }
    return PyLong_AsLongLong(PyList_GET_ITEM(entry, 6));
}

/* One port of a pair side (the Python loop's inner ``for port_side, port``). */
static int
add_port(PyObject *ports, PyObject *side_key, PyObject *port_table_type, unsigned port,
         PyObject *packets, PyObject *nbytes)
{
    PyObject *table = PyDict_GetItemWithError(ports, side_key);
    if (table == NULL) {
        if (PyErr_Occurred() || !(table = PyObject_CallNoArgs(port_table_type)))
            return -1;
        int failed = PyDict_SetItem(ports, side_key, table);
        Py_DECREF(table);
        if (failed)
            return -1;
    }
    Py_INCREF(table);
    int status = -1;
    PyObject *by_port = NULL, *pport = NULL;
    if (!(by_port = PyObject_GetAttr(table, s_ports)) || !(pport = PyLong_FromUnsignedLong(port)))
        goto done;
    if (!PyDict_CheckExact(by_port)) {
        PyErr_SetString(PyExc_TypeError, "fold_flows: a port table's ports is not a dict");
        goto done;
    }
    PyObject *counts = PyDict_GetItemWithError(by_port, pport);
    if (counts != NULL) {
        status = list_add(counts, 0, packets) < 0 || list_add(counts, 1, nbytes) < 0 ? -1 : 0;
    } else if (PyErr_Occurred()) {
        goto done;
    } else if (PyDict_GET_SIZE(by_port) < PORTS_TRACKED) { /* _PortTable.add, tracked */
        PyObject *fresh = PyList_New(2);
        if (fresh != NULL) {
            PyList_SET_ITEM(fresh, 0, Py_NewRef(packets));
            PyList_SET_ITEM(fresh, 1, Py_NewRef(nbytes));
        }
        status = fresh == NULL || PyDict_SetItem(by_port, pport, fresh) < 0 ? -1 : 0;
        Py_XDECREF(fresh);
    } else {
        PyObject *r = PyObject_CallMethodObjArgs(table, s_add, pport, packets, nbytes, NULL);
        status = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    }
done:
    Py_XDECREF(by_port);
    Py_XDECREF(pport);
    Py_DECREF(table);
    return status;
}

/* A SYN's flow (engine._Accumulator._tcp_attempt). */
static int
tcp_attempt(PyObject *pair, int side, PyObject *table, const unsigned char *k, Py_ssize_t alen,
            unsigned dport)
{
    PyObject *tcp = NULL, *opened_ports = NULL, *one = NULL, *pport = NULL;
    int status = -1;
    if (!(tcp = PyObject_GetAttr(pair, s_tcp)) ||
        !(opened_ports = PyObject_GetAttr(pair, s_opened_ports)) ||
        !(one = PyLong_FromLong(1)) || !(pport = PyLong_FromUnsignedLong(dport)) ||
        !PyList_CheckExact(tcp) ||
        !PyList_CheckExact(opened_ports) || PyList_GET_SIZE(tcp) < 2 ||
        PyList_GET_SIZE(opened_ports) < 2) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "fold_flows: unexpected pair layout");
        goto done;
    }
    PyObject *counts = PyList_GET_ITEM(tcp, side);
    if (list_add(counts, 0, one) < 0)
        goto done;
    int failed = 0;
    PyObject *reverse = reverse_flow(table, k, alen, &failed); /* borrowed: used at once */
    if (failed)
        goto done;
    if (reverse == NULL) {
        if (list_add(counts, 1, one) < 0)
            goto done;
    } else {
        long long flags = flags_of(reverse);
        if (flags == -1 && PyErr_Occurred())
            goto done;
        if ((flags & F_RST) && !(flags & F_SYN) && list_add(counts, 2, one) < 0)
            goto done;
    }
    PyObject *opened = PyList_GET_ITEM(opened_ports, side);
    if (!PyDict_CheckExact(opened)) {
        PyErr_SetString(PyExc_TypeError, "fold_flows: unexpected pair layout");
        goto done;
    }
    status = dict_add(opened, pport, one);
done:
    Py_XDECREF(tcp);
    Py_XDECREF(opened_ports);
    Py_XDECREF(one);
    Py_XDECREF(pport);
    return status;
}

/* The truth of ``value``, a new reference (released here; NULL passes an error on): 1, 0, or
 * -1 with an exception set. */
static int
truth_of(PyObject *value)
{
    if (value == NULL)
        return -1;
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

/* pair.first = min(pair.first, value), or max for pair.last */
static int
keep_extreme(PyObject *pair, PyObject *name, double value, int lowest)
{
    PyObject *current = PyObject_GetAttr(pair, name);
    if (current == NULL)
        return -1;
    double now = PyFloat_AsDouble(current);
    Py_DECREF(current);
    if (now == -1.0 && PyErr_Occurred())
        return -1;
    if (lowest ? value < now : value > now) {
        PyObject *fresh = PyFloat_FromDouble(value);
        if (fresh == NULL)
            return -1;
        int failed = PyObject_SetAttr(pair, name, fresh);
        Py_DECREF(fresh);
        return failed;
    }
    return 0;
}

/* The activity histogram, inline for the common case (one span, the pair's width, in range);
 * else acc.add_activity(pair, entry). */
static int
add_histogram(PyObject *acc, PyObject *pair, PyObject *entry, long long start, Py_ssize_t buckets,
              PyObject *zero_histogram, PyObject *nbytes)
{
    long long shift = attr_ll(acc, s_activity_shift);
    long long span_last = entry_ll(entry, 8);
    if ((shift == -1 || span_last == -1) && PyErr_Occurred())
        return -1;
    PyObject *histogram = PyObject_GetAttr(pair, s_activity);
    if (histogram == NULL)
        return -1;
    int status = -1;
    if (histogram == Py_None) {
        Py_DECREF(histogram);
        histogram = NULL;
        PyObject *pshift = PyLong_FromLongLong(shift);
        if (!pshift || !(histogram = PyObject_CallNoArgs(zero_histogram)) ||
            PyObject_SetAttr(pair, s_activity, histogram) < 0 ||
            PyObject_SetAttr(pair, s_activity_shift, pshift) < 0) {
            Py_XDECREF(pshift);
            Py_XDECREF(histogram);
            return -1;
        }
        Py_DECREF(pshift);
    }
    long long pair_shift = attr_ll(pair, s_activity_shift);
    if (pair_shift == -1 && PyErr_Occurred())
        goto done;
    long long offset = span_last - start;
    long long index = offset >= 0 && shift < 63 ? offset >> shift : -1;
    if (PyList_GET_SIZE(entry) > SPLIT_BYTES || pair_shift != shift || index < 0 ||
        index >= buckets) {
        PyObject *r = PyObject_CallMethodObjArgs(acc, s_add_activity, pair, entry, NULL);
        status = r == NULL ? -1 : 0;
        Py_XDECREF(r);
        goto done;
    }
    /* histogram[index] += nbytes, as the array's own item assignment would */
    PyObject *old = PySequence_GetItem(histogram, (Py_ssize_t)index);
    if (old == NULL)
        goto done;
    PyObject *sum = PyNumber_Add(old, nbytes);
    Py_DECREF(old);
    if (sum == NULL)
        goto done;
    status = PySequence_SetItem(histogram, (Py_ssize_t)index, sum);
    Py_DECREF(sum);
done:
    Py_DECREF(histogram);
    return status;
}

PyDoc_STRVAR(fold_flows_doc,
"fold_flows(acc, table, proto_name, port_keys, pair_type, port_table_type, zero_histogram,\n"
"           buckets) -> (packets, bytes)\n\n"
"Fold one flow table (TCP or UDP) into acc.pairs as engine._Accumulator._fold_table does;\n"
"return the packets and bytes of its flows.");

static PyObject *
fold_flows(PyObject *module, PyObject *args)
{
    PyObject *acc, *table, *proto_name, *port_keys, *pair_type, *port_table_type,
        *zero_histogram;
    Py_ssize_t buckets;
    if (!PyArg_ParseTuple(args, "OO!UO!OOOn", &acc, &PyDict_Type, &table, &proto_name,
                          &PyTuple_Type, &port_keys, &pair_type, &port_table_type,
                          &zero_histogram, &buckets))
        return NULL;
    if (PyTuple_GET_SIZE(port_keys) != 2 || !PyDict_CheckExact(table)) {
        PyErr_SetString(PyExc_TypeError, "fold_flows: port_keys must be a pair, table a dict");
        return NULL;
    }
    int is_tcp = PyUnicode_CompareWithASCIIString(proto_name, "tcp") == 0;
    PyObject *pairs = PyObject_GetAttr(acc, s_pairs);
    if (pairs == NULL)
        return NULL;
    PyObject *result = NULL;
    long long packets_total = 0, bytes_total = 0;
    long long max_peers = -1, compact_at = -1, fps = -1, start = 0;
    PyObject *start_object = NULL;
    /* each read only if the one before worked: no C-API call with an exception pending */
    if ((max_peers = attr_ll(acc, s_max_peers)) == -1 && PyErr_Occurred())
        goto done;
    if ((compact_at = attr_ll(acc, s_compact_at)) == -1 && PyErr_Occurred())
        goto done;
    if ((fps = attr_ll(acc, s_frac_per_second)) == -1 && PyErr_Occurred())
        goto done;
    if (!(start_object = PyObject_GetAttr(acc, s_activity_start)))
        goto done;
    if (start_object != Py_None)
        start = PyLong_AsLongLong(start_object);
    Py_DECREF(start_object);
    if (PyErr_Occurred() || !PyDict_CheckExact(pairs) || fps <= 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "fold_flows: unexpected accumulator");
        goto done;
    }
    Py_ssize_t at = 0;
    PyObject *key, *entry;
    while (PyDict_Next(table, &at, &key, &entry)) {
        if (!PyBytes_CheckExact(key) || !PyList_CheckExact(entry) ||
            PyList_GET_SIZE(entry) < SPLIT_BYTES) {
            PyErr_SetString(PyExc_TypeError, "fold_flows: unexpected flow entry");
            goto done;
        }
        Py_INCREF(key);
        Py_INCREF(entry);
        int failed = 1;
        PyObject *src = NULL, *dst = NULL, *pair_key = NULL, *pair = NULL, *counts = NULL;
        /* owned: the callbacks below run Python code */
        PyObject *packets = Py_NewRef(PyList_GET_ITEM(entry, 0));
        PyObject *nbytes = Py_NewRef(PyList_GET_ITEM(entry, 1));
        const unsigned char *k = (const unsigned char *)PyBytes_AS_STRING(key);
        Py_ssize_t alen = PyBytes_GET_SIZE(key) == 12 ? 4 : 16;
        if (PyBytes_GET_SIZE(key) != 2 * alen + 4) {
            PyErr_SetString(PyExc_TypeError, "fold_flows: unexpected flow key");
            goto next;
        }
        if (!(src = PyBytes_FromStringAndSize((const char *)k, alen)) ||
            !(dst = PyBytes_FromStringAndSize((const char *)k + alen, alen)))
            goto next;
        int side = memcmp(k, k + alen, alen) <= 0 ? 0 : 1;
        if (!(pair_key = side == 0 ? PyTuple_Pack(2, src, dst) : PyTuple_Pack(2, dst, src)))
            goto next;
        long long packets_ll = PyLong_AsLongLong(packets), bytes_ll = -1;
        if ((packets_ll == -1 && PyErr_Occurred()) ||
            ((bytes_ll = PyLong_AsLongLong(nbytes)) == -1 && PyErr_Occurred()))
            goto next;
        if (__builtin_add_overflow(packets_total, packets_ll, &packets_total) ||
            __builtin_add_overflow(bytes_total, bytes_ll, &bytes_total)) {
            PyErr_SetString(PyExc_OverflowError, "fold_flows: a total passed 2**63");
            goto next;
        }
        pair = PyDict_GetItemWithError(pairs, pair_key);
        if (pair == NULL) {
            if (PyErr_Occurred())
                goto next;
            if (PyDict_GET_SIZE(pairs) >= max_peers) {
                /* full: a flow of a new pair that had no exchange is folded at once */
                int bad = 0;
                PyObject *reverse = reverse_flow(table, k, alen, &bad);
                PyObject *palen = bad ? NULL : PyLong_FromSsize_t(alen);
                if (palen == NULL)
                    goto next;
                int yes = truth_of(PyObject_CallMethodObjArgs(
                    acc, s_fold_flow, src, dst, entry, reverse ? reverse : Py_None,
                    is_tcp ? Py_True : Py_False, key, palen, NULL));
                Py_DECREF(palen);
                if (yes < 0)
                    goto next;
                if (yes) {
                    failed = 0;
                    goto next;
                }
                if (PyDict_GET_SIZE(pairs) >= compact_at) {
                    PyObject *r = PyObject_CallMethodObjArgs(acc, s_compact, NULL);
                    if (r == NULL)
                        goto next;
                    Py_DECREF(r);
                }
            }
            if (!(pair = PyObject_CallNoArgs(pair_type)) ||
                PyDict_SetItem(pairs, pair_key, pair) < 0)
                goto next;
        } else {
            Py_INCREF(pair);
        }
        /* an exchange: ACKs both ways (TCP), or an answer (UDP) */
        int was = truth_of(PyObject_GetAttr(pair, s_exchanged));
        if (was < 0)
            goto next;
        long long flags = flags_of(entry);
        if (flags == -1 && PyErr_Occurred())
            goto next;
        if (!was && (!is_tcp || (flags & F_ACK))) {
            int bad = 0;
            PyObject *reverse = reverse_flow(table, k, alen, &bad);
            if (bad)
                goto next;
            if (reverse != NULL) {
                long long reverse_flags = flags_of(reverse);
                if (reverse_flags == -1 && PyErr_Occurred())
                    goto next;
                if ((!is_tcp || (reverse_flags & F_ACK)) &&
                    PyObject_SetAttr(pair, s_exchanged, Py_True) < 0)
                    goto next;
            }
        }
        if (!(counts = PyObject_GetAttr(pair, s_packets)) || list_add(counts, side, packets) < 0)
            goto next;
        Py_SETREF(counts, PyObject_GetAttr(pair, s_bytes));
        if (counts == NULL || list_add(counts, side, nbytes) < 0)
            goto next;
        long long times[4]; /* first second, first fraction, last second, last fraction */
        for (int i = 0; i < 4; i++) {
            if ((times[i] = entry_ll(entry, 2 + i)) == -1 && PyErr_Occurred())
                goto next;
        }
        long long fsec = times[0], ffrac = times[1], lsec = times[2], lfrac = times[3];
        if (keep_extreme(pair, s_first, (double)fsec + (double)ffrac / (double)fps, 1) < 0 ||
            keep_extreme(pair, s_last, (double)lsec + (double)lfrac / (double)fps, 0) < 0)
            goto next;
        Py_SETREF(counts, PyObject_GetAttr(pair, s_protocols));
        if (counts == NULL || !PyDict_CheckExact(counts) ||
            dict_add(counts, proto_name, packets) < 0)
            goto next;
        Py_SETREF(counts, PyObject_GetAttr(pair, s_ports));
        if (counts == NULL || !PyDict_CheckExact(counts))
            goto next;
        unsigned sport = k[2 * alen] << 8 | k[2 * alen + 1];
        unsigned dport = k[2 * alen + 2] << 8 | k[2 * alen + 3];
        if (add_port(counts, PyTuple_GET_ITEM(port_keys, side), port_table_type, sport, packets,
                     nbytes) < 0 ||
            add_port(counts, PyTuple_GET_ITEM(port_keys, 1 - side), port_table_type, dport,
                     packets, nbytes) < 0)
            goto next;
        long long first_flags = entry_ll(entry, 7);
        if (first_flags == -1 && PyErr_Occurred())
            goto next;
        if (is_tcp && (first_flags & (F_SYN | F_ACK)) == F_SYN &&
            tcp_attempt(pair, side, table, k, alen, dport) < 0)
            goto next;
        if (add_histogram(acc, pair, entry, start, buckets, zero_histogram, nbytes) < 0)
            goto next;
        failed = 0;
    next:
        Py_XDECREF(src);
        Py_XDECREF(dst);
        Py_XDECREF(pair_key);
        Py_XDECREF(pair);
        Py_XDECREF(counts);
        Py_DECREF(packets);
        Py_DECREF(nbytes);
        Py_DECREF(key);
        Py_DECREF(entry);
        if (failed) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "fold_flows: unexpected pair layout");
            goto done;
        }
    }
    result = Py_BuildValue("LL", packets_total, bytes_total);
done:
    Py_DECREF(pairs);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {"fold_flows", fold_flows, METH_VARARGS, fold_flows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "analyzer.capture._walk",
    "nwcap's compiled record walk (see analyzer/capture/engine.py).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__walk(void)
{
    struct { PyObject **slot; const char *text; } names[] = {
        {&s_pairs, "pairs"}, {&s_max_peers, "max_peers"}, {&s_compact_at, "compact_at"},
        {&s_frac_per_second, "frac_per_second"}, {&s_activity_start, "activity_start"},
        {&s_activity_shift, "activity_shift"}, {&s_fold_flow, "_fold_flow"},
        {&s_compact, "compact"}, {&s_add_activity, "add_activity"}, {&s_exchanged, "exchanged"},
        {&s_packets, "packets"}, {&s_bytes, "bytes"}, {&s_first, "first"}, {&s_last, "last"},
        {&s_protocols, "protocols"}, {&s_ports, "ports"}, {&s_tcp, "tcp"},
        {&s_opened_ports, "opened_ports"}, {&s_activity, "activity"}, {&s_add, "add"},
        {&s_udp, "udp"}, {&s_roll, "roll"}, {&s_inspect_tcp, "inspect_tcp"}, {&s_names, "names"},
        {&s_dns_message, "dns_message"}, {&s_add_frame, "add_frame"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (*names[i].slot == NULL && !(*names[i].slot = PyUnicode_InternFromString(names[i].text)))
            return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module != NULL && (PyModule_AddIntConstant(module, "ABI", WALK_ABI) < 0 ||
                           PyModule_AddIntConstant(module, "PORTS_TRACKED", PORTS_TRACKED) < 0 ||
                           PyModule_AddIntConstant(module, "SPLIT_BYTES", SPLIT_BYTES) < 0)) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
