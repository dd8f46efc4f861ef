/*
 * Files and images (issue 14): the attachments a chat line carries, the
 * session's upload token that every file URL needs, and the uploads
 * waiting in a conversation's input until they are sent.
 */
(function (ChatApp, Backbone, _) {
  'use strict';

  var models = ChatApp.models;

  // Served inline by the server, so shown as pictures; anything else
  // (SVG and HTML included) is a download link.
  var INLINE_IMAGES = ['image/jpeg', 'image/png', 'image/gif', 'image/webp'];
  var THUMB_BOX = 240; // px: the largest a thumbnail is shown in a chat line
  var MAX_ATTACHMENTS = 50; // no well-behaved message has more; a bad payload cannot flood the page

  function count(value) {
    return typeof value === 'number' && isFinite(value) && value >= 0 ? Math.floor(value) : undefined;
  }

  // The attachments of a live payload or history item, well-formed ones only.
  function attachmentsOf(value) {
    if (!_.isArray(value)) {
      return [];
    }
    return _.compact(_.map(value.slice(0, MAX_ATTACHMENTS), function (a) {
      if (!_.isObject(a) || typeof a.id !== 'string' || !a.id) {
        return null;
      }
      return {
        id: a.id,
        name: typeof a.name === 'string' && a.name ? a.name : 'file',
        size: count(a.size),
        type: typeof a.type === 'string' ? a.type : '',
        width: count(a.width),
        height: count(a.height),
        thumb: a.thumb === true
      };
    }));
  }

  // "532 B", "12.3 KiB", "4.0 MiB": binary units, as the server's limits are.
  function formatSize(bytes) {
    if (bytes === undefined) {
      return '';
    }
    if (bytes < 1024) {
      return bytes + ' B';
    }
    var units = ['KiB', 'MiB', 'GiB', 'TiB'];
    var value = bytes;
    var unit = -1;
    do {
      value /= 1024;
      unit += 1;
    } while (value >= 1024 && unit < units.length - 1);
    return (value < 10 ? value.toFixed(1) : Math.round(value)) + ' ' + units[unit];
  }

  function isInlineImage(attachment) {
    return attachment.thumb && _.contains(INLINE_IMAGES, attachment.type);
  }

  // The size to show a thumbnail at, from the image's own size, so that the
  // line has its final height before the picture arrives (the list stays
  // scrolled to the bottom).
  function thumbBox(attachment) {
    var w = attachment.width;
    var h = attachment.height;
    if (!w || !h) {
      return null;
    }
    var scale = Math.min(1, THUMB_BOX / w, THUMB_BOX / h);
    return { width: Math.max(1, Math.round(w * scale)), height: Math.max(1, Math.round(h * scale)) };
  }

  /*
   * The session's upload token: the server binds it to this socket's
   * session, so it is asked for after each login and kept fresh while it
   * is used. Every /files URL carries it (`<img src>` cannot send a header).
   * `wanted` is triggered when something needs a token that is not there.
   */
  var FileAccess = Backbone.Model.extend({
    defaults: { token: '', expiresAt: 0 },

    initialize: function (attrs, options) {
      this.base = (options && options.base) || ''; // the server's origin; '' for this page's
    },

    valid: function () {
      return !!this.get('token') && this.get('expiresAt') - Date.now() > 5000;
    },

    // A token from the server, valid for `expiresIn` seconds. `granted` is
    // triggered even when the token is the same string as before.
    grant: function (token, expiresIn) {
      this.set({ token: token, expiresAt: Date.now() + expiresIn * 1000 });
      this.trigger('granted');
    },

    // The session it belonged to is gone (disconnected): ask again before use.
    expire: function () {
      this.set('expiresAt', 0);
    },

    // Ask for a token unless a valid one is held.
    ensure: function () {
      if (!this.valid()) {
        this.trigger('wanted');
      }
    },

    url: function (id, thumb) {
      return this.base + '/files/' + encodeURIComponent(id) + (thumb ? '/thumb' : '') +
        '?token=' + encodeURIComponent(this.get('token'));
    },

    uploadUrl: function () {
      return this.base + '/api/uploads';
    },

    // What the line template shows of one attachment.
    describe: function (attachment, index) {
      var image = isInlineImage(attachment);
      var ready = this.valid();
      var box = image ? thumbBox(attachment) : null;
      return _.extend({}, attachment, {
        index: index,
        isImage: image,
        sizeText: formatSize(attachment.size),
        dimensions: attachment.width && attachment.height ? attachment.width + '\u00d7' + attachment.height : '',
        fileUrl: ready ? this.url(attachment.id, false) : '',
        thumbUrl: ready && image ? this.url(attachment.id, true) : '',
        boxWidth: box ? box.width : 0,
        boxHeight: box ? box.height : 0
      });
    }
  });

  /*
   * A file being uploaded (or uploaded) for the conversation's next message.
   * state: uploading | ready | failed; `upload` is the server's answer
   * ({id, name, size, type, ...}) once ready. `abort` (not an attribute)
   * stops the request while it runs.
   */
  var PendingUpload = Backbone.Model.extend({
    defaults: { name: '', size: 0, type: '', loaded: 0, state: 'uploading', error: '', upload: null },

    initialize: function () {
      this.abort = null;
      this.preview = ''; // an object URL of the chosen image, shown while it waits
    },

    percent: function () {
      var size = this.get('size');
      if (this.get('state') !== 'uploading') {
        return 100;
      }
      return size > 0 ? Math.min(100, Math.floor(100 * this.get('loaded') / size)) : 0;
    },

    failed: function (message) {
      this.abort = null;
      this.set({ state: 'failed', error: message });
    },

    // Uploaded: shown from now on under the name others will see (the
    // server may have cleaned it).
    ready: function (answer) {
      this.abort = null;
      var name = typeof answer.name === 'string' && answer.name ? answer.name : this.get('name');
      this.set({ state: 'ready', error: '', loaded: this.get('size'), upload: answer, name: name });
    },

    // Stop it if it still runs and free the preview.
    dispose: function () {
      if (this.abort) {
        var abort = this.abort;
        this.abort = null;
        abort();
      }
      if (this.preview) {
        window.URL.revokeObjectURL(this.preview);
        this.preview = '';
      }
    },

    view: function () {
      return _.extend(_.clone(this.attributes), {
        cid: this.cid,
        percent: this.percent(),
        sizeText: formatSize(this.get('size')),
        preview: this.preview
      });
    }
  });

  var PendingUploads = Backbone.Collection.extend({
    model: PendingUpload,

    busy: function () {
      return this.some(function (u) { return u.get('state') === 'uploading'; });
    },

    ready: function () {
      return this.where({ state: 'ready' });
    }
  });

  _.extend(models, {
    FileAccess: FileAccess,
    PendingUpload: PendingUpload,
    PendingUploads: PendingUploads,
    attachmentsOf: attachmentsOf,
    formatSize: formatSize,
    INLINE_IMAGES: INLINE_IMAGES,
    isInlineImage: isInlineImage
  });
})(ChatApp, Backbone, _);
